"""Training: fast_dev_run for every config in configs/train/, data module, loggers, CLI entry points."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from physics.config import ConfigError
from physics.waveforms import make_waveform_file, read_waveforms
from surrogate import load_cbae
from training.cli import add_train_parser, add_waveforms_parser, main
from training.data import WaveformDataModule
from training.module import CBAEModule, label_weights, profile_mse
from training.run import load_train_config, make_logger, train

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs" / "train").glob("*.yaml"))
TINY = ["data.n_train=600", "data.n_val=200", "data.batch_size=128", "logger.kind=csv"]


def test_configs_exist():
    names = {p.stem for p in CONFIGS}
    assert {"cbae", "cbae_semisup", "cbae_biexp"} <= names


@pytest.mark.parametrize("cfg", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_fast_dev_run_every_config(cfg, tmp_path):
    res = train(
        cfg,
        TINY + [f"data.dir={tmp_path / 'data'}", "output.export=null"],
        fast_dev_run=True,
        output_dir=tmp_path / "run",
        progress=False,
    )
    run = Path(res["run_dir"])
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["data"]["n_train"] == 600 and resolved["output"]["dir"] == str(tmp_path / "run")
    model = load_cbae(res["model"])
    assert model.electronics["shape"] == {"cbae_biexp": "biexp", "cbae_ringing": "ringing"}.get(
        cfg.stem, "lognormal"
    )
    assert np.isfinite(res["metrics"]["train/loss"])
    assert not (ROOT / "checkpoints" / "should_not_exist.pt").exists()


def test_label_fraction_masks_and_workers(tmp_path):
    cfg = load_train_config(
        ROOT / "configs/train/cbae_semisup.yaml",
        TINY + [f"data.dir={tmp_path}", "data.n_train=4000", "data.num_workers=1"],
    )
    dm = WaveformDataModule(cfg["data"], electronics=cfg["electronics"])
    dm.prepare_data()
    dm.setup()
    frac = float(dm.train_ds.label_mask.mean())
    assert 0.08 < frac < 0.12  # 10% of 4000, binomial sd 0.5%
    batches = list(dm.train_dataloader())  # one worker process opens its own h5 handle
    assert sum(len(b["adc"]) for b in batches) == 4000
    seen = torch.cat([b["params"][:, 1] for b in batches]).sort().values
    data, _ = read_waveforms(dm.files()[0])
    torch.testing.assert_close(seen, data["time"].sort().values)
    # label loss is masked per sample: labels of unlabelled waveforms do not matter
    norm = dm.normalisation()
    mod = CBAEModule(cfg["model"], norm, cfg["loss"], cfg["optim"])
    b = dm.train_ds.__getitems__(list(range(256)))
    out1 = mod.losses(b)
    b2 = dict(b)
    b2["params"] = torch.where(b["labelled"][:, None], b["params"], b["params"] + 100.0)
    out2 = mod.losses(b2)
    assert float(out1["label"]) == pytest.approx(float(out2["label"]), rel=1e-6)
    assert float(out1["teacher"]) == pytest.approx(float(out2["teacher"]), rel=1e-6)


def test_bad_train_config(tmp_path):
    with pytest.raises(ConfigError):
        load_train_config(ROOT / "configs/train/cbae.yaml", ["bogus=1"])
    with pytest.raises(ConfigError):
        load_train_config(ROOT / "configs/train/cbae.yaml", ["logger.kind=tensorboard"])
    cfg = load_train_config(ROOT / "configs/train/cbae.yaml", ["data.label_fraction=2"])
    with pytest.raises(ConfigError):
        WaveformDataModule(cfg["data"])


def test_logger_choice(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import CSVLogger

    assert isinstance(make_logger({"logger": {"kind": "csv"}}, tmp_path), CSVLogger)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    lg = make_logger({"logger": {"kind": "wandb"}}, tmp_path)
    import os

    assert os.environ["WANDB_MODE"] == "offline"
    assert type(lg).__name__ in ("WandbLogger", "CSVLogger")


def test_parsers_set_func():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd")
    add_waveforms_parser(sub)
    add_train_parser(sub)
    for argv in (
        ["waveforms", "simulate", "-o", "x.h5"],
        ["waveforms", "analyze", "x.h5", "-o", "y.h5"],
        ["waveforms", "generate", "--charge", "1", "-o", "g.h5"],
        ["train", "--config", "c.yaml"],
    ):
        assert callable(p.parse_args(argv).func)


def test_cli_simulate_analyze_generate(tmp_path):
    model = ROOT / "checkpoints" / "cbae_default.pt"
    wf = tmp_path / "wf.h5"
    assert (
        main(
            [
                "waveforms",
                "simulate",
                "--shape",
                "lognormal",
                "--noise",
                "medium",
                "-n",
                "500",
                "--seed",
                "3",
                "--charge-prior",
                "log",
                "-o",
                str(wf),
            ]
        )
        == 0
    )
    assert read_waveforms(wf)[1]["generator"]["charge_prior"] == "log"
    out = tmp_path / "out.h5"
    assert main(["waveforms", "analyze", str(wf), "--model", str(model), "-o", str(out)]) == 0
    res, _ = read_waveforms(out, group="analysis")
    truth, _ = read_waveforms(wf)
    assert res["denoised"].shape == (500, 64)
    assert float((res["charge"] - truth["charge"]).abs().median()) < 0.3
    gen = tmp_path / "gen.h5"
    assert (
        main(
            [
                "waveforms",
                "generate",
                "--model",
                str(model),
                "--charge",
                "5",
                "10",
                "--time",
                "10",
                "--repeat",
                "3",
                "-o",
                str(gen),
            ]
        )
        == 0
    )
    g, _ = read_waveforms(gen)
    assert g["adc"].shape == (6, 64)
    # decoder output area ~ gain * charge (the model learned the pulse normalisation)
    area = (g["clean"].double() - 200.0).sum(1) * 2.0 / 100.0
    np.testing.assert_allclose(area.numpy(), g["charge"].double().numpy(), rtol=0.05)
    assert main(["waveforms", "simulate", "--shape", "square", "-o", str(tmp_path / "z.h5")]) == 2
    bad = tmp_path / "bad.h5"
    make_waveform_file(bad, "default", n=10, seed=0)
    assert main(["waveforms", "analyze", str(bad), "--model", str(tmp_path / "none.pt"), "-o", str(out)]) == 2


def _default_waveforms(n: int, seed: int) -> tuple[dict, dict]:
    """n labelled waveforms of the default electronics (charges U(0.5, 30) p.e., noise scale U(0.3, 3)) and
    a fixed normalisation for a small CBAE built on them."""
    from physics.electronics import Electronics
    from physics.waveforms import simulate_waveforms

    el = Electronics.load("default")
    d = simulate_waveforms(el, n, torch.Generator().manual_seed(seed), (0.5, 30.0), (-5.0, 40.0), [0.3, 3.0])
    norm = {
        "wf_offset": 200.0,
        "wf_scale": 40.0,
        "param_mean": [15.0, 17.0],
        "param_std": [8.5, 13.0],
        "sample_times": d["sample_times"].tolist(),
        "n_samples": 64,
    }
    return d, norm


def test_label_beta_weighting():
    """beta-NLL weighting (Seitzer et al. 2022) of the label term: weights var^(beta-1) normalised to unit
    mean, so with a constant predicted variance it reduces exactly to the plain squared error (beta = 1),
    and with varying variance it differs; beta outside [0, 1] is rejected."""
    d, norm = _default_waveforms(256, seed=3)
    batch = {
        "adc": d["adc"].float(),
        "clean": d["clean"],
        "params": torch.stack([d["charge"], d["time"]], 1),
        "labelled": torch.ones(256, dtype=torch.bool),
    }
    model_cfg = {"encoder": "aligned_raw", "decoder": "shift_linear", "enc_hidden": [16], "dec_hidden": [8]}
    optim = {"lr": 1e-3, "max_epochs": 1}
    mods = {}
    for beta in (1.0, 0.5):
        torch.manual_seed(0)
        mods[beta] = CBAEModule({**model_cfg, "n_free": 1}, norm, {"label_beta": beta}, optim)
    with torch.no_grad():
        for m in mods.values():
            m.model.var_head[-1].weight.zero_()
            m.model.var_head[-1].bias.fill_(-3.0)
    l1, l05 = (float(mods[b].losses(batch)["label"]) for b in (1.0, 0.5))
    assert l05 == pytest.approx(l1, rel=1e-5)
    # closed form: var = (1, 4), beta = 1/2 -> var^(-1/2) = (1, 1/2), unit mean -> (4/3, 2/3)
    lv = torch.log(torch.tensor([[1.0, 1.0], [4.0, 1.0], [9.0, 1.0]]))
    w = label_weights(lv, torch.tensor([1.0, 1.0, 0.0]), 0.5)
    torch.testing.assert_close(w[:2], torch.tensor([[4 / 3, 1.0], [2 / 3, 1.0]]))
    with pytest.raises(ConfigError, match="label_beta"):
        CBAEModule({**model_cfg, "n_free": 1}, norm, {"label_beta": 1.5}, optim)


def test_profile_weighted_reconstruction_is_the_profile_likelihood_gradient():
    """recon_weight=profile: the gradient of the weighted MSE is parallel to that of the profile Gaussian
    likelihood with an unknown noise variance per waveform, sum_i (S/2) log RSS_i (independent closed form);
    uniform = plain MSE; masked rows do not contribute."""
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([0.1, 0.5, 1.0, 2.0, 5.0], dtype=torch.float64)[:, None]
    target = torch.randn(5, 64, generator=g, dtype=torch.float64) * scale
    pred = (0.1 * torch.randn(5, 64, generator=g, dtype=torch.float64)).requires_grad_()
    (g_prof,) = torch.autograd.grad(profile_mse(pred, target, True), pred)
    (g_like,) = torch.autograd.grad((32.0 * torch.log((pred - target).pow(2).mean(1))).sum(), pred)
    ratio = g_like / g_prof
    torch.testing.assert_close(ratio, ratio.mean().expand_as(ratio))
    assert float(ratio.mean()) > 0
    # the quietest waveform gets ~ (5 / 0.1)^2 the weight of the noisiest per unit residual
    w = g_prof.abs().sum(1) / (pred - target).detach().abs().sum(1)
    assert float(w[0] / w[4]) > 1000
    plain = profile_mse(pred, target, False)
    torch.testing.assert_close(plain, (pred - target).pow(2).mean())
    mask = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(profile_mse(pred, target, False, mask), (pred - target)[:2].pow(2).mean())


def test_recon_weight_is_validated():
    norm = {"wf_offset": 200.0, "wf_scale": 40.0, "n_samples": 64}
    model_cfg = {"enc_hidden": [8], "dec_hidden": [8], "n_free": 1}
    with pytest.raises(ConfigError, match=r"train\.loss\.recon_weight.*'whiten'"):
        CBAEModule(model_cfg, norm, {"recon_weight": "whiten"}, {"lr": 1e-3, "max_epochs": 1})


def test_ema_weights_follow_the_exponential_average():
    """optim.ema_decay d: after the first step the average holds the weights, then w_ema = d w_ema + (1-d) w;
    the averaged model is the one validated and exported; d outside [0, 1) raises."""
    norm = {"wf_offset": 200.0, "wf_scale": 40.0, "n_samples": 64}
    model_cfg = {"enc_hidden": [8], "dec_hidden": [8], "n_free": 1}
    d = 0.9
    mod = CBAEModule(model_cfg, norm, {}, {"lr": 1e-3, "max_epochs": 1, "ema_decay": d})
    w = mod.model.encoder[0].weight
    with torch.no_grad():
        w.fill_(1.0)
    mod.on_train_batch_end(None, None, 0)
    with torch.no_grad():
        w.fill_(3.0)
    mod.on_train_batch_end(None, None, 1)
    ema_w = mod.final_model.encoder[0].weight
    assert mod.final_model is not mod.model
    torch.testing.assert_close(ema_w, torch.full_like(ema_w, d * 1.0 + (1 - d) * 3.0))
    torch.testing.assert_close(w, torch.full_like(w, 3.0))  # the trained weights are untouched
    off = CBAEModule(model_cfg, norm, {}, {"lr": 1e-3, "max_epochs": 1})
    assert off.final_model is off.model
    with pytest.raises(ConfigError, match=r"train\.optim\.ema_decay"):
        CBAEModule(model_cfg, norm, {}, {"lr": 1e-3, "max_epochs": 1, "ema_decay": 1.0})


def test_variance_refit_calibrates_the_exported_head_only():
    """optim.var_refit_epochs: refitting the variance head by the Gaussian NLL about the exported (moving
    average) means drives the mean squared pull of the labelled waveforms to 1 per parameter (the NLL's
    stationarity in the last bias, a closed form), leaves every other weight bit for bit and ignores the
    unlabelled waveforms (their labels here are absurd); a negative epoch count raises."""
    d, norm = _default_waveforms(384, seed=4)
    model_cfg = {
        "encoder": "aligned_raw",
        "decoder": "shift_linear",
        "enc_hidden": [16],
        "dec_hidden": [8],
        "n_free": 1,
    }
    torch.manual_seed(0)
    mod = CBAEModule(
        model_cfg, norm, {}, {"lr": 1e-3, "max_epochs": 1, "ema_decay": 0.5, "var_refit_epochs": 3}
    )
    assert mod.var_refit_epochs == 3
    mod.on_train_batch_end(None, None, 0)
    lab = torch.arange(384) % 3 != 0
    params = torch.stack([d["charge"], d["time"]], 1)
    params[~lab] = 1e3
    batch = {"adc": d["adc"].float(), "params": params, "labelled": lab}
    m = mod.final_model
    frozen = {k: v.clone() for k, v in m.state_dict().items() if not k.startswith("var_head")}
    raw = {k: v.clone() for k, v in mod.model.state_dict().items()}
    mod.refit_variance([batch], epochs=600, lr=1e-2)
    for k, v in m.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), k
    for k, v in mod.model.state_dict().items():
        assert torch.equal(v, raw[k]), k
    assert all(p.requires_grad for p in m.parameters())
    with torch.no_grad():
        mu, logvar, _ = m.encode(batch["adc"][lab])
    pull2 = ((mu - m.normalise_params(params[lab])) ** 2 * torch.exp(-logvar)).mean(0)
    torch.testing.assert_close(pull2, torch.ones(2), atol=0.03, rtol=0)
    with pytest.raises(ConfigError, match=r"train\.optim\.var_refit_epochs"):
        CBAEModule(model_cfg, norm, {}, {"lr": 1e-3, "max_epochs": 1, "var_refit_epochs": -1})
