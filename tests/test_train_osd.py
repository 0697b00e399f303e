"""Stage-2 trainer on tiny models written to disk and loaded by the real loaders: the shipped
config parses, missing paths are named, a few steps reduce the loss on a fixed batch, a resumed run
reproduces the uninterrupted one bit for bit, and the exported official files load back."""

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel  # noqa: E402

from conftest import spawn_ranks  # noqa: E402
from haodiff_data.shards.schema import encode_sample  # noqa: E402
from haodiff_model.bench.osd import (  # noqa: E402
    TINY_DPG,
    TINY_PROMPT,
    TINY_SDXL_UNET_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
)
from haodiff_model.config import ConfigError  # noqa: E402
from haodiff_model.io.official import load_img_encoder, load_lora_weights, save_dpg  # noqa: E402
from haodiff_model.losses.dists import DISTS_TOTAL_CHANNELS  # noqa: E402
from haodiff_model.losses.vgg import vgg16_features  # noqa: E402
from haodiff_model.nets.dpg import DPGConfig, DPGNetwork  # noqa: E402
from haodiff_model.nets.prompt import PromptEmbedderConfig  # noqa: E402
from haodiff_model.nets.restorer import SD21_BASE_SCHEDULER_CONFIG  # noqa: E402
from haodiff_model.nets.sdxl_cond import load_sdxl_conditioner  # noqa: E402
from haodiff_model.train.distributed import DistContext  # noqa: E402
from haodiff_model.train.osd import OUTPUT_FILES, train  # noqa: E402
from haodiff_model.train.osd_build import build_parts  # noqa: E402
from haodiff_model.train.osd_config import TrainOSDConfig  # noqa: E402
from haodiff_model.train.osd_step import Stage2Step, export_official  # noqa: E402
from haodiff_model.train.state import CheckpointManager, read_metrics  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SIZE = 32
PROMPT = {**TINY_PROMPT, "feature_redraw_interval": 2}  # the redraw schedule takes part in the resume check
CPU = DistContext()


@pytest.fixture(autouse=True, scope="module")
def no_onednn():
    """oneDNN compiles kernels for every new conv shape on first use (4-20 s for the first stage-2 step
    of these tiny models on 2 busy cores, against 0.4 s per step after); the native CPU kernels don't."""
    previous = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False
    yield
    torch.backends.mkldnn.enabled = previous


def _write_shards(root: Path, shards: int = 3, per_shard: int = 4) -> None:
    rng = np.random.default_rng(0)
    for s in range(shards):
        with wds.TarWriter(str(root / f"train-r000-{s:06d}.tar"), encoder=False, mtime=0) as tar:
            for i in range(per_shard):
                hq = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                lq = np.clip(hq.astype(np.int16) + rng.integers(-40, 41, hq.shape), 0, 255).astype(np.uint8)
                mask = np.zeros((SIZE, SIZE), np.uint8)
                tar.write(encode_sample(f"s{s}k{i}", hq, lq, mask, mask, {"index": i}))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Tiny SD2.1-like and SDXL-like diffusers folders, stage-1 DPG, VGG16 / DISTS weights, shards."""
    root = tmp_path_factory.mktemp("osd")
    torch.manual_seed(0)
    UNet2DConditionModel.from_config(TINY_UNET_CONFIG).save_pretrained(root / "sd" / "unet")
    AutoencoderKL.from_config(TINY_VAE_CONFIG).save_pretrained(root / "sd" / "vae")
    DDIMScheduler.from_config(SD21_BASE_SCHEDULER_CONFIG).save_pretrained(root / "sd" / "scheduler")
    UNet2DConditionModel.from_config(TINY_SDXL_UNET_CONFIG).save_pretrained(root / "sdxl" / "unet")
    cfg = TrainOSDConfig.from_dict({"dpg": TINY_DPG})
    save_dpg(DPGNetwork(cfg.dpg, torch.Generator().manual_seed(1)), root / "dpg.pth")
    torch.save({f"features.{k}": v for k, v in vgg16_features().state_dict().items()}, root / "vgg16.pth")
    g = torch.Generator().manual_seed(2)
    shape = (1, DISTS_TOTAL_CHANNELS, 1, 1)
    torch.save({"alpha": 0.1 + torch.rand(shape, generator=g), "beta": 0.1 + torch.rand(shape, generator=g)},
               root / "dists.pt")
    (root / "shards").mkdir()
    _write_shards(root / "shards")
    return root


def _config(files: Path, out: Path, **sections) -> TrainOSDConfig:
    """The shipped pipelines/train_osd.yaml with tiny models and local paths patched in."""
    data = TrainOSDConfig.from_yaml(ROOT / "pipelines" / "train_osd.yaml").to_dict()
    patch = {
        "dpg": TINY_DPG,
        "prompt_embedder": PROMPT,
        "model": {"pretrained_model": str(files / "sd"), "dpg_weights": str(files / "dpg.pth")},
        "discriminator": {"model": str(files / "sdxl"), "head_channels": 16, "head_norm_groups": 8},
        "loss": {"vgg16_weights": str(files / "vgg16.pth"), "dists_weights": str(files / "dists.pt")},
        "data": {"urls": [str(files / "shards")], "num_workers": 0, "epoch_length": 3, "shuffle_buffer": 4,
                 "pin_memory": False},
        "train": {"lr": 1e-3, "disc_lr": 1e-3, "device": "cpu", "precision": "fp32"},
        "val": {"every": 2},
        "output": {"dir": str(out), "log_every": 1, "ckpt_every": 2, "tensorboard": False},
    }
    for name, values in list(patch.items()) + list(sections.items()):
        data[name] = {**(data.get(name) or {}), **values}
    return TrainOSDConfig.from_dict(data, "test config")


def test_shipped_config_parses_and_placeholders_are_named(files, tmp_path):
    cfg = TrainOSDConfig.from_yaml(ROOT / "pipelines" / "train_osd.yaml")
    assert cfg == TrainOSDConfig()  # the shipped file shows the defaults, which are defined once
    assert cfg.dpg == DPGConfig.from_yaml(ROOT / "pipelines" / "dpg.yaml")  # referenced, not copied
    assert cfg.prompt_embedder == PromptEmbedderConfig.from_yaml(ROOT / "pipelines" / "dpg.yaml")
    assert (cfg.model.lora_rank, cfg.model.lora_alpha, cfg.model.timestep, cfg.model.cfg_scale) == (16, 16.0, 199, 3.5)
    assert (cfg.train.lr, cfg.data.batch_size, cfg.loss.gan_weight) == (1e-5, 2, 0.01)
    assert TrainOSDConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="set these to local paths") as err:
        build_parts(cfg)
    for key in ("model.pretrained_model", "model.dpg_weights", "discriminator.model", "loss.vgg16_weights",
                "loss.dists_weights"):
        assert f"{key} = '/path/to/" in str(err.value)
    with pytest.raises(ConfigError, match=r"unknown key 'model.lora_rnak'"):
        TrainOSDConfig.from_yaml(ROOT / "pipelines" / "train_osd.yaml", ["model.lora_rnak=8"])
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        TrainOSDConfig.from_dict({"modle": {}})
    missing = _config(files, tmp_path, model={"pretrained_model": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="do not exist: model.pretrained_model: .*nowhere"):
        build_parts(missing)
    for override, message in [("train.seed=1.5", "train.seed: expected an integer, got 1.5"),
                              ("train.ema_decay='0.9'", "train.ema_decay: expected a number, got '0.9'"),
                              ("discriminator.start_step=-1", "discriminator: invalid lora_rank=0"),
                              ("prompt_embedder.light_changer=1", "prompt_embedder.light_changer: expected true")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            TrainOSDConfig.from_yaml(ROOT / "pipelines" / "train_osd.yaml", [override])
    wrong = _config(files, tmp_path, discriminator={"model": str(files / "sd")})
    with pytest.raises(ConfigError, match="is not an SDXL UNet"):
        build_parts(wrong)


def _fixed_batch(files: Path) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    hq = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
    return {"hq": hq, "lq": (hq + 0.3 * torch.randn(hq.shape, generator=g)).clamp(-1, 1)}


@pytest.mark.parametrize("backbone", ["sdxl", "sd21", "none"])
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(files, tmp_path, backbone):
    folder = {"sdxl": "sdxl", "sd21": "sd", "none": "sd"}[backbone]
    cfg = _config(files, tmp_path, discriminator={"backbone": backbone, "model": str(files / folder)},
                  model={"sample_latent": False})
    step = Stage2Step(build_parts(cfg), cfg.train, cfg.discriminator, cfg.loss, CPU)
    batch = _fixed_batch(files)
    trainable = {n: p.detach().clone() for n, p in step.g_params.items()}
    d_params = [p for g in step.opt_d.param_groups for p in g["params"]] if step.opt_d else []
    d_before = [p.detach().clone() for p in d_params]
    losses = [step(batch, i) for i in range(6)]
    totals = [r["mse"].item() + r["ea_dists"].item() for r in losses]
    assert all(np.isfinite(totals)) and totals[-1] < 0.9 * totals[0], totals
    gan = backbone != "none"
    assert all((r["d_loss"].item() > 0) == gan and (r["gan"].item() > 0) == gan for r in losses)
    moved = {n.split(".")[0] for n, p in step.g_params.items() if not torch.equal(p, trainable[n])}
    assert moved == {"encoder", "restorer"}  # prompt embedders and UNet LoRA both train
    assert bool(d_params) == gan and all(not torch.equal(a, b) for a, b in zip(d_before, d_params))
    if backbone == "sdxl":  # the embedding changers train with D
        changers = {id(p) for p in step.disc_module.conditioner.parameters()}
        assert changers and changers <= {id(p) for p in d_params}
    assert all(not p.requires_grad for p in step.generator_module.encoder.feature_extractor.parameters())
    assert gan == (step.disc is not None)


def _losses(out: Path) -> list[tuple[int, float, float]]:
    return [(r["step"], r["train/loss"], r["train/d_loss"]) for r in read_metrics(out / "metrics.jsonl")
            if "train/loss" in r]


def test_resume_reproduces_the_uninterrupted_run_and_exports_load(files, tmp_path):
    straight = _config(files, tmp_path / "straight", train={"max_steps": 4, "ema_decay": 0.5})
    enc_file, lora_file = train(straight, log=lambda m: None, ctx=CPU)
    reference = _losses(tmp_path / "straight")
    assert [s for s, _, _ in reference] == [1, 2, 3, 4]

    first = _config(files, tmp_path / "resumed", train={"max_steps": 2, "ema_decay": 0.5})
    train(first, log=lambda m: None, ctx=CPU)
    second = dataclasses.replace(first, train=dataclasses.replace(first.train, max_steps=4))
    with pytest.raises(FileExistsError, match="--resume"):
        train(second, log=lambda m: None, ctx=CPU)
    train(second, resume=True, log=lambda m: None, ctx=CPU)
    assert _losses(tmp_path / "resumed") == reference  # bit for bit, D included
    val = [r["val/loss"] for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "val/loss" in r]
    assert val == [r["val/loss"] for r in read_metrics(tmp_path / "straight" / "metrics.jsonl") if "val/loss" in r]
    assert len(val) == 2 and (tmp_path / "resumed" / "val" / "step-00000004.png").is_file()
    # restoration metrics at each validation, overall and per kind; the best by val/lpips kept (across the resume)
    records = [r for r in read_metrics(tmp_path / "resumed" / "metrics.jsonl") if "val/loss" in r]
    for r in records:
        assert all(0 <= r[k] for k in ("val/psnr", "val/lpips", "val/dists")) and r["val/psnr"] < 100
        assert any(k.startswith(("val/hmb/", "val/generic/", "val/clean/")) for k in r)
    best = min(records, key=lambda r: r["val/lpips"])
    best_dir = tmp_path / "resumed" / "best"
    assert json.loads((best_dir / "best.json").read_text()) == {"step": best["step"], "metric": "val/lpips",
                                                                 "value": best["val/lpips"]}
    assert all((best_dir / name).is_file() for name in OUTPUT_FILES)
    resumed_dir = tmp_path / "resumed"
    assert torch.equal(torch.load(resumed_dir / "img_encoder_weights.pth")["model_state_dict"][
        "main_performer.linear_embed.weight"], torch.load(enc_file)["model_state_dict"][
        "main_performer.linear_embed.weight"])

    # the exported official files load into fresh models (ours and the official layouts)
    encoder, report = load_img_encoder(enc_file)
    assert report.ok and any(r.startswith("official training-only") for r in report.ignored_by_reason())
    conditioner, creport = load_sdxl_conditioner(enc_file)
    assert creport.ok
    parts = build_parts(_config(files, tmp_path / "fresh"))
    assert load_lora_weights(parts.restorer.unet, lora_file).ok
    from safetensors.torch import load_file

    assert all(k.startswith("unet.") and k.endswith((".lora_A.weight", ".lora_B.weight"))
               for k in load_file(str(lora_file)))
    # start a new run from the exported files (official weights load into ours)
    cont = _config(files, tmp_path / "continued", model={"init_img_encoder": str(enc_file),
                                                         "init_lora": str(lora_file)})
    parts = build_parts(cont)
    assert torch.equal(parts.encoder.main_performer.linear_embed.weight,
                       encoder.main_performer.linear_embed.weight)
    assert torch.equal(parts.conditioner.embedding_changer1.linear1.weight,
                       conditioner.embedding_changer1.linear1.weight)


def test_discriminator_waits_for_start_step_and_exports_hold_the_ema_weights(files, tmp_path):
    cfg = _config(files, tmp_path, discriminator={"start_step": 2}, train={"ema_decay": 0.5},
                  model={"sample_latent": False})
    step = Stage2Step(build_parts(cfg), cfg.train, cfg.discriminator, cfg.loss, CPU)
    batch = _fixed_batch(files)
    d_params = [p for g in step.opt_d.param_groups for p in g["params"]]
    d_before = [p.detach().clone() for p in d_params]
    early = [step(batch, i) for i in range(2)]
    assert all(r["gan"].item() == 0 and r["d_loss"].item() == 0 for r in early)
    assert all(torch.equal(a, b) for a, b in zip(d_before, d_params))  # D untouched before start_step
    late = step(batch, 2)
    assert late["gan"].item() > 0 and late["d_loss"].item() > 0
    assert all(not torch.equal(a, b) for a, b in zip(d_before, d_params))

    enc_file, _ = export_official(step, tmp_path / "export")
    exported, _ = load_img_encoder(enc_file)
    live = dict(step.generator_module.encoder.named_parameters())
    differs = []
    for name, value in exported.named_parameters():
        shadow = step.ema.shadow.get(f"encoder.{name}")
        if shadow is not None:
            assert torch.equal(value, shadow), name  # the file holds the EMA weights ...
            differs.append(not torch.equal(shadow, live[name]))
    assert differs and any(differs)  # ... which are not the live ones


def test_bf16_autocast_step_trains_with_bf16_frozen_weights(files, tmp_path, monkeypatch):
    """The CUDA bf16 path (frozen UNet/VAE/D weights cast to bf16, the step under bf16 autocast) run on
    the CPU, which autocasts to bf16 as well: losses close to the fp32 step's, trainable weights fp32."""
    cfg = _config(files, tmp_path, model={"sample_latent": False})
    batch = _fixed_batch(files)
    fp32 = Stage2Step(build_parts(cfg), cfg.train, cfg.discriminator, cfg.loss, CPU)
    reference = fp32(batch, 0)
    monkeypatch.setattr("haodiff_model.train.osd_step.autocast_dtype", lambda precision, device: torch.bfloat16)
    step = Stage2Step(build_parts(cfg), cfg.train, cfg.discriminator, cfg.loss, CPU)
    assert step.amp_dtype == torch.bfloat16
    frozen_unet = [p for n, p in step.restorer.unet.named_parameters() if not p.requires_grad]
    assert frozen_unet and all(p.dtype == torch.bfloat16 for p in frozen_unet)
    assert all(p.dtype == torch.bfloat16 for p in step.restorer.vae.parameters())
    assert all(p.dtype == torch.float32 for p in step.g_params.values())  # LoRA and prompt embedders
    assert all(p.dtype == torch.float32 for p in step.generator_module.encoder.feature_extractor.parameters())
    before = {n: p.detach().clone() for n, p in step.g_params.items()}
    d_params = [p for g in step.opt_d.param_groups for p in g["params"]]
    d_before = [p.detach().clone() for p in d_params]
    calls = []
    hook = step.restorer.unet.register_forward_hook(lambda m, args, out: calls.append(out.sample.dtype))
    result = step(batch, 0)
    hook.remove()
    assert calls and all(dtype == torch.bfloat16 for dtype in calls)  # the UNet really ran in bf16
    for name in ("mse", "ea_dists", "gan", "d_loss"):
        value, expected = result[name].item(), reference[name].item()
        assert np.isfinite(value) and value > 0, name
        assert value == pytest.approx(expected, rel=0.1), (name, value, expected)
    assert all(p.dtype == torch.float32 for p in step.g_params.values())
    moved = {n.split(".")[0] for n, p in step.g_params.items() if not torch.equal(p, before[n])}
    assert moved == {"encoder", "restorer"}
    assert all(not torch.equal(a, b) for a, b in zip(d_before, d_params))


def _state_digest(module: torch.nn.Module) -> str:
    values = module.state_dict().values()
    return hashlib.sha256(b"".join(v.detach().float().numpy().tobytes() for v in values)).hexdigest()


def _ddp_child(rank: int, world: int, port: int, cfg_dict: dict, report_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.backends.mkldnn.enabled = False
    import haodiff_model.train.osd as osd_train
    from haodiff_model.train.distributed import init_distributed, shutdown_distributed

    built = []

    class RecordingStep(osd_train.Stage2Step):  # keeps a handle on the step the trainer builds
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append((self, _state_digest(self.generator_module), _state_digest(self.disc_module)))

    osd_train.Stage2Step = RecordingStep
    ctx = init_distributed("cpu")
    osd_train.train(TrainOSDConfig.from_dict(cfg_dict), log=lambda m: None, ctx=ctx)
    (step, g_start, d_start), = built
    report = {"backend": ctx.backend, "g_start": g_start, "d_start": d_start,
              "g": _state_digest(step.generator_module), "d": _state_digest(step.disc_module),
              "ddp": [type(step.generator).__name__, type(step.disc).__name__]}
    Path(report_dir, f"rank{rank}.json").write_text(json.dumps(report))
    shutdown_distributed()


def test_two_process_gloo_run_keeps_generator_and_discriminator_replicas_identical(files, tmp_path):
    out = tmp_path / "ddp"
    cfg = _config(files, out, train={"max_steps": 2}, val={"every": 0})
    spawn_ranks(_ddp_child, (cfg.to_dict(), str(tmp_path)), 2, "2-process stage-2 run")
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["backend"] == r1["backend"] == "gloo"
    assert r0["ddp"] == r1["ddp"] == ["DistributedDataParallel", "DistributedDataParallel"]
    assert (r0["g_start"], r0["d_start"]) == (r1["g_start"], r1["d_start"])  # same initial weights
    # every rank trained on its own batches; averaged gradients and the shared redraw RNG keep the
    # replicas (projection matrices included) identical
    assert r0["g"] != r0["g_start"] and r0["d"] != r0["d_start"]
    assert (r0["g"], r0["d"]) == (r1["g"], r1["d"])
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r] == [1, 2]
    state = CheckpointManager.load(out / "checkpoints" / "step-00000002")
    assert state["world_size"] == 2 and len(state["rng"]) == 2
    assert all((out / name).is_file() for name in OUTPUT_FILES)
