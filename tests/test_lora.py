"""LoRA mode: one frozen base holds teacher, student and critic; the fused export equals the student."""
import torch
from test_dmd2_loop import accel, make

from fewstep.backbones import adapter_for, lora
from fewstep.core.denoiser import Denoiser
from fewstep.methods.dmd2 import DMD2
from fewstep.run import build
from fewstep.training import loop


def lora_method(teacher_dir, out, dtype="float32"):
    cfg, _, source = make(teacher_dir, out)
    cfg.model.mode, cfg.model.lora_rank, cfg.model.teacher_dtype = "lora", 4, dtype
    torch.manual_seed(0)
    teacher = build.load_teacher(cfg.model)
    critic = build.make_critic(teacher, cfg.model)
    method = DMD2(cfg.method, teacher.denoiser, build.make_student(teacher, cfg.model), critic,
                  build.make_head(critic, cfg.model))
    return cfg, method, source, teacher


def test_lora_roles_share_one_base_and_train_only_adapters(tiny_teacher_dir, tmp_path):
    cfg, method, source, teacher = lora_method(tiny_teacher_dir, tmp_path)
    model = teacher.denoiser.backbone.model
    assert method.student.denoiser.backbone.model is model and method.critic.backbone.model is model
    tr = method.trainable()
    base_params = {id(p) for n, p in model.named_parameters() if "lora_" not in n}
    assert not base_params & {id(p) for ps in tr.values() for p in ps}
    assert not {id(p) for p in tr["student"]} & {id(p) for p in tr["critic"]}
    base0 = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    x, t, c = torch.randn(2, 1, 8, 8), torch.full((2,), 0.5), source.batch(0, 0).cond[:2]
    with torch.no_grad():
        before = teacher.denoiser(x, t, c)
        assert torch.equal(method.student.denoiser(x, t, c), before)     # B = 0: adapters start as the base
    loop.train(cfg, method, source, accel(tmp_path))
    with torch.no_grad():
        assert torch.equal(teacher.denoiser(x, t, c), before)             # teacher = base, adapters disabled
        s, k = method.student.denoiser(x, t, c), method.critic(x, t, c)
    assert (s - before).abs().max() > 1e-4 and (k - before).abs().max() > 1e-4 and (s - k).abs().max() > 1e-4
    assert all(torch.equal(v, base0[n]) for n, v in model.state_dict().items() if n in base0)
    merged = lora.merged_copy(model, "student")
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    d = Denoiser(adapter_for(merged, teacher.denoiser.prediction_type), teacher.denoiser.schedule)
    with torch.no_grad():
        torch.testing.assert_close(d(x, t, c), s, rtol=1e-4, atol=1e-5)


def test_lora_over_bf16_base_keeps_fp32_adapters(tiny_teacher_dir, tmp_path):
    cfg, method, source, teacher = lora_method(tiny_teacher_dir, tmp_path, "bfloat16")
    assert teacher.denoiser.backbone.model.conv_in.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for ps in method.trainable().values() for p in ps)
    cfg.train.max_steps = 2
    loop.train(cfg, method, source, accel(tmp_path))
