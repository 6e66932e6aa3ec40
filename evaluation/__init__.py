"""Few-shot benchmark evaluation of exported engines with OpenFlamingo's protocol.

The protocol is `open_flamingo/eval/evaluate.py` of open-flamingo 2.0.1 (templates, effective
shots, demonstration sampling for a seed, beams and new tokens per task, post-processing,
metrics), run on `runtime.pipeline.FlamingoPipeline` (torch-free; its prefix and vision caches
make repeated demonstrations cheap). Modules, following the data:

* `tasks`     the task table: templates, search settings, post-processing, the files of DIR;
* `datasets`  readers of the official file formats (Karpathy caption JSON, VQA question and
              annotation JSON, Hateful Memes JSONL) and of the demo task's episodes;
* `sampling`  which test items and which demonstrations a seed gives (numpy/random replicas
              of OpenFlamingo's numpy, Python and torch draws);
* `rices`     retrieval-based demonstrations (RICES) from the export's own image features or a
              CLIP model the user gives;
* `metrics`   CIDEr (pycocoevalcap's scorer and PTB tokenizer), VQA accuracy (the official
              answer normalization), ROC AUC, exact match;
* `runner`    plan (items and demonstrations, once) then run every export and score;
* `report`    the per-precision table of scores and deltas, and its PNG plot;
* `reference` the same protocol through open_flamingo's own evaluation functions on a PyTorch
              model (tests and benchmark only; imports torch).
"""
