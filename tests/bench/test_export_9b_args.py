"""benchmarks/export_9b.py refuses a --layers that leaves the model without cross-attention
(its quick trial used to fail after writing the model files)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))


@pytest.mark.parametrize(("shape", "layers"), [("0.6b", 2), ("9b", 3)])
def test_layers_below_the_cross_attention_interval_are_refused(
    shape: str, layers: int, capsys: pytest.CaptureFixture[str]
) -> None:
    import export_9b

    with pytest.raises(SystemExit) as exit_info:
        export_9b.main(["--shape", shape, "--layers", str(layers)])
    assert exit_info.value.code == 2
    assert "needs --layers >= 4" in capsys.readouterr().err
