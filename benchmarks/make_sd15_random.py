"""Write a StableDiffusionPipeline folder whose UNet has the full SD1.5 architecture (860M parameters, random
weights, 64x64 latents, cross-attention width 768); the text encoder is a 2-layer CLIP of width 768 and the
VAE a tiny 2x one (tests/tiny_models.py), so nothing is downloaded. For GPU checks of full-size training
(FSDP, memory), e.g. benchmarks/gpu_methods.sh.

    python benchmarks/make_sd15_random.py /tmp/sd15_random
"""
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import tiny_models  # noqa: E402


def main() -> None:
    from diffusers import UNet2DConditionModel

    args = [a for a in sys.argv[1:] if a != "--tiny"]
    out = Path(args[0] if args else "/tmp/sd15_random")
    pipe = tiny_models.sd15()
    torch.manual_seed(0)
    if "--tiny" not in sys.argv:     # --tiny: keep the tiny UNet, to check a script on a CPU
        pipe.text_encoder = tiny_models.clip_text(pipe.tokenizer, hidden=768).eval()
        pipe.unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768).eval()   # SD1.5's config
    pipe.register_modules(unet=pipe.unet, text_encoder=pipe.text_encoder)
    pipe.save_pretrained(out)
    (out / "prompts.txt").write_text("a photo of a cat\na watercolor of a lighthouse\n")
    print(f"wrote {out}: UNet {sum(p.numel() for p in pipe.unet.parameters()) / 1e6:.0f}M parameters")


if __name__ == "__main__":
    main()
