"""Where does FlexAttention stall on this GPU machine? (issue 10, run by tests/gpu_bench.sh)

Each stage prints its elapsed time; if one hangs, faulthandler prints every thread's stack after
LIMIT seconds and exits, so the log shows where. Stages: a trivial inductor compile, a compiled
block mask, compiled flex attention forward and backward (GQA), a second row length (does it
recompile?), and qdpo's own shared-prefix mask_mod.
Usage: python3 tests/gpu_flex_probe.py [LIMIT_SECONDS]
"""

import faulthandler
import sys
import time

import torch

LIMIT = int(sys.argv[1]) if len(sys.argv) > 1 else 60
faulthandler.dump_traceback_later(LIMIT, exit=True)
T0 = time.monotonic()


def say(msg: str) -> None:
    torch.cuda.synchronize()
    print(f"{time.monotonic() - T0:7.1f}s  {msg}", flush=True)


def main() -> None:
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = "cuda"
    x = torch.randn(4096, device=dev)
    torch.compile(lambda t: t * 2 + 1)(x)
    say("inductor: trivial kernel compiled")

    def causal(b, h, q, kv):
        return kv <= q

    flex = torch.compile(flex_attention)
    for t in (2048, 2048, 3072, 4096):
        bm = create_block_mask(causal, B=1, H=None, Q_LEN=t, KV_LEN=t, device=dev)
        say(f"T={t}: block mask")
        q = torch.randn(1, 32, t, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(1, 8, t, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(1, 8, t, 128, device=dev, dtype=torch.bfloat16, requires_grad=True)
        out = flex(q, k, v, block_mask=bm, enable_gqa=True)
        say(f"T={t}: forward")
        out.sum().backward()
        say(f"T={t}: backward")

    sys.path.insert(0, ".")
    from qdpo.attention import CHOSEN, REJECTED, _block_mask

    seg = torch.zeros(1, 4096, dtype=torch.long, device=dev)
    seg[:, 2048:] = 1
    side = torch.zeros_like(seg)
    side[:, 512:1024] = CHOSEN
    side[:, 1024:2048] = REJECTED
    for t in (4096, 4096):
        _block_mask(seg[:, :t], side[:, :t])
        say(f"qdpo shared-prefix block mask T={t}")
    with torch.no_grad():
        for t in (4096, 4096):
            bm = _block_mask(seg[:, :t], side[:, :t])
            q = torch.randn(1, 32, t, 128, device=dev, dtype=torch.bfloat16)
            k = torch.randn(1, 8, t, 128, device=dev, dtype=torch.bfloat16)
            flex(q, k, k, block_mask=bm, enable_gqa=True)
            say(f"qdpo mask, flex forward T={t}")
    print("flex probe: all stages passed", flush=True)


if __name__ == "__main__":
    main()
