"""AdamW's update on CPU: torch's per-tensor loop (its CPU default), foreach and fused, on the tiny SD1.5 UNet
of benchmarks/step_cost.py and on the bundled digits teacher's UNet; interleaved in one process, one thread.
Also checks how far foreach and fused drift from the loop after 5 updates.

    python benchmarks/adamw_kernels.py
"""
import time

import torch
from diffusers import UNet2DConditionModel
torch.set_num_threads(1)
torch.manual_seed(0)
def unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D","DownBlock2D"), up_block_types=("UpBlock2D","CrossAttnUpBlock2D"), cross_attention_dim=32, norm_num_groups=32)
from fewstep.digits import DIGITS_TEACHER
from diffusers import UNet2DModel
for name, make in [("tiny sd15", unet), ("digits", lambda: UNet2DModel.from_pretrained(DIGITS_TEACHER, subfolder="unet"))]:
    m = make(); ps = [p for p in m.parameters()]
    for p in ps: p.grad = torch.randn_like(p)
    print(name, sum(p.numel() for p in ps), "params in", len(ps), "tensors")
    opts = {k: torch.optim.AdamW(ps, lr=1e-4, weight_decay=0.01, **kw) for k, kw in
            [("loop", dict(foreach=False)), ("foreach", dict(foreach=True)), ("fused", dict(fused=True))]}
    times = {k: [] for k in opts}
    for r in range(30):
        for k, o in opts.items():
            t0 = time.perf_counter(); o.step(); times[k].append(time.perf_counter() - t0)
    for k, v in times.items():
        v = sorted(v)[5:-5]; print(f"  {k}: {1e3*sum(v)/len(v):.2f} ms/step")
# exactness: same start, same grads
for kw in [dict(foreach=True), dict(fused=True)]:
    a, b = unet(), unet()
    oa = torch.optim.AdamW(a.parameters(), lr=1e-3, weight_decay=0.01, foreach=False)
    ob = torch.optim.AdamW(b.parameters(), lr=1e-3, weight_decay=0.01, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for pa, pb in zip(a.parameters(), b.parameters()):
            gr = torch.randn(pa.shape, generator=g); pa.grad = gr.clone(); pb.grad = gr.clone()
        oa.step(); ob.step()
    d = max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
    print(kw, "max |diff| after 5 steps:", d)
