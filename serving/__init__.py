"""An export as a service: an OpenAI-compatible HTTP server over `runtime.FlamingoPipeline`.

Torch-free (FastAPI, uvicorn, prometheus_client; the `serve` extra) and click-free; among our
packages it imports `runtime` only. One module per job, imports only downward:

* `protocol`: the API schemas (request fields, response and stream-chunk objects) and the
  OpenAI-style error object (`APIError`);
* `media`: image URLs (data URLs; `file://` inside the allowed folder) -> checked bytes;
* `chat`: chat messages -> an OpenFlamingo few-shot prompt through `runtime.prompts` (the
  templates of `flamingo-export run --demos`), and the demonstrations' affinity key;
* `engine`: one pipeline behind a request queue, micro-batched into `generate_batch` on its own
  thread, streaming events (text deltas, finish, usage) back to asyncio;
* `metrics`: the Prometheus metrics of `/metrics`;
* `app`: the FastAPI app (routes, API key, body limit, SSE), over a local engine or Ray;
* `server`: the app on uvicorn with one local engine (`flamingo-export serve`);
* `ray_deploy`, `ray_router`: the same app on Ray Serve, N engine replicas, routed by
  demonstrations (the `ray` extra, imported only there).

The mapping from chat to prompt and every limit are written down in docs/serving.md.
"""
