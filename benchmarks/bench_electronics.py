"""Electronics benchmark: clean-waveform (expect) and digitised (sample) throughput on this CPU.

Writes benchmarks/results/electronics.json (atomic). Usage: python benchmarks/bench_electronics.py
(a 2-core CPU shared with other jobs: rates are lower bounds).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._util import atomic_write_json  # noqa: E402
from physics.electronics import Electronics  # noqa: E402


def rate(fn, n_items: int, reps: int = 3) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return reps * n_items / (time.perf_counter() - t0)


def main() -> dict:
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    out: dict = {"threads": torch.get_num_threads(), "note": "shared 2-core CPU; lower bounds", "presets": {}}
    g = torch.Generator().manual_seed(0)
    C, per = 20000, 5
    for name in ("default", "biexp", "ringing"):
        el = Electronics.load(name)
        ch = torch.arange(C).repeat_interleave(per)
        t = 40 * torch.rand(C * per, generator=g, dtype=torch.float64)
        q = 0.5 + 2 * torch.rand(C * per, generator=g, dtype=torch.float64)
        r_exp = rate(lambda el=el, ch=ch, t=t, q=q: el.expect(ch, t, q, C), C * per)
        r_smp = rate(lambda el=el, ch=ch, t=t, q=q: el.sample(ch, t, q, C, generator=g), C)
        tt = t.clone().requires_grad_(True)

        def grad(el=el, ch=ch, tt=tt, q=q):
            el.expect(ch, tt, q, C).sum().backward()

        r_grad = rate(grad, C * per)
        out["presets"][name] = {
            "expect_pe_per_s": r_exp,
            "sample_waveforms_per_s": r_smp,
            "expect_backward_pe_per_s": r_grad,
            "n_samples": el.n_samples,
            "pe_per_waveform": per,
        }
        print(
            f"{name:8s} expect {r_exp:.3g} p.e./s  expect+backward {r_grad:.3g} p.e./s  "
            f"sample {r_smp:.3g} waveforms/s ({per} p.e. each, {el.n_samples} samples)"
        )
    atomic_write_json(ROOT / "benchmarks" / "results" / "electronics.json", out)
    return out


if __name__ == "__main__":
    main()
