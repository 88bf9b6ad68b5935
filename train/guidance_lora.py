"""Guidance-distilled LoRA (arXiv 2312.06899): a LoRA on the frozen teacher learns to reproduce its classifier-free
guidance uncond + w (cond - uncond) in one pass, so the guided teacher costs one network call per step. The output
folder is the teacher's pipeline with the LoRA fused (and the LoRA alone where the family exports LoRAs); sample it
at the teacher's usual step count with guidance_scale 1, or distil it further with another method as its teacher
(--model.teacher <folder> --method.guidance_scale 1).

With no arguments it distills the bundled digits teacher's CFG 1.25 on a CPU in minutes.

Examples:
    accelerate launch train/guidance_lora.py
    accelerate launch train/guidance_lora.py --method.guidance_scale 2 --model.lora_rank 8
    accelerate launch train/guidance_lora.py --preset sd15_guidance_lora --model.teacher /path/to/sd15 \\
        --data.prompts prompts.txt --data.images /path/to/sd_generated_images
    accelerate launch train/dmd2.py --model.teacher runs/guidance_lora_digits --method.guidance_scale 1
    python train/guidance_lora.py --help
"""
from fewstep.run.cli import main

if __name__ == "__main__":
    main("guidance_lora", __doc__)
