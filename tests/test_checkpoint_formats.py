"""Checkpoint formats of the EDM-format and flow-matching priors (reddiff/priors/edm.py, flow.py).

Each format is written from randomly initialised tiny networks in the checkpoint's own key layout (``torch.save`` of a
state dict of tensors, and safetensors), read back through the real loader, and checked for: strict keys and shapes
(a missing, unexpected or mis-shaped key is refused, named), the preconditioning against the reference formula
written out here by hand around the raw network, the grid protocol ``eps(x_t, t)`` against the conversion from ``D``
at ``sigma_t``, the registry entries (``weights status``) and the Hydra presets (the exact missing-file line).
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from reddiff.core import weights as W
from reddiff.core.checkpoint import CheckpointError, UnsafeCheckpointError
from reddiff.priors.adm import UNet, UNetConfig
from reddiff.priors.ddpmnet import PNPFLOW_AFHQ_CAT, PNPFLOW_CELEBA, DDPMUNet, DDPMUNetConfig
from reddiff.priors.edm import FORMAT_OF_WEIGHTS, EDMPrior
from reddiff.priors.flow import FlowPrior
from reddiff.priors.unet import StateDictMismatchError, UNetPrior

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
TINY_ADM = UNetConfig(image_size=16, model_channels=32, out_channels=6, num_res_blocks=1, attention_resolutions=(8,),
                      channel_mult=(1, 2), num_head_channels=16, learn_sigma=True)
TINY_FLOW = DDPMUNetConfig(image_size=16, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,))
SIGMAS = torch.tensor([0.002, 0.07, 0.5, 1.3, 11.0, 80.0], dtype=F64)
NEW = ("inversebench_ffhq256", "pnpflow_celeba", "pnpflow_afhq_cat")


def randomised(net: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter moved off its initial value (zero-initialised output convs included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return net.eval()


@pytest.fixture
def adm():
    torch.manual_seed(0)
    return randomised(UNet(TINY_ADM), 1)


@pytest.fixture
def velocity_net():
    torch.manual_seed(0)
    return randomised(DDPMUNet(TINY_FLOW), 2)


def wrapped_sd(net) -> dict:
    """The preconditioner's state dict: the network under ``model.`` (InverseBench/EDM ``self.model``)."""
    return {f"model.{k}": v.clone() for k, v in net.state_dict().items()}


def save(sd: dict, path: Path, nest: str | None = None) -> Path:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save({nest: sd} if nest else sd, path)
    return path


def x_like(shape, seed=3, batch=None):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((batch or len(SIGMAS), *shape), generator=g, dtype=F64)


# ------------------------------------------------------------------------------------------ EDM: preconditioning
def hand_edm(net, x, s):
    """NVlabs/edm training/networks.py:660-667 (EDMPrecond), sigma_data 0.5, written out."""
    sd = 0.5
    b = (-1, 1, 1, 1)
    c_skip = sd ** 2 / (s ** 2 + sd ** 2)
    c_out = s * sd / (s ** 2 + sd ** 2).sqrt()
    c_in = 1 / (sd ** 2 + s ** 2).sqrt()
    c_noise = s.log() / 4
    return c_skip.view(b) * x + c_out.view(b) * net(c_in.view(b) * x, c_noise)[:, :3]


def hand_vp(net, x, s):
    """NVlabs/edm training/networks.py:501-508, 515-517 (VPPrecond, sigma_inv), beta_d 19.9, beta_min 0.1, M 1000."""
    b = (-1, 1, 1, 1)
    t = ((0.1 ** 2 + 2 * 19.9 * (1 + s ** 2).log()).sqrt() - 0.1) / 19.9
    c_in = 1 / (s ** 2 + 1).sqrt()
    return x - s.view(b) * net(c_in.view(b) * x, 999 * t)[:, :3]


@pytest.mark.parametrize("precond,hand", [("edm", hand_edm), ("vp", hand_vp)])
@pytest.mark.parametrize("fmt", ["ema.pt", "net.pt", "flat.safetensors"])
def test_edm_wrapped_format_loads_strictly_and_preconditions_exactly(tmp_path, adm, precond, hand, fmt):
    nest = {"ema.pt": "ema", "net.pt": "net"}.get(fmt)
    path = save(wrapped_sd(adm), tmp_path / f"ck_{fmt}", nest)
    prior = EDMPrior(str(path), arch=TINY_ADM, precond=precond, layout="wrapped", dtype="float64")
    assert prior.shape == (3, 16, 16) and prior.nparams == sum(p.numel() for p in adm.parameters())
    x = x_like(prior.shape)
    ref = adm.to(F64)
    with torch.no_grad():
        d = prior.denoise(x, SIGMAS)
        assert d.shape == x.shape and d.dtype == F64
        assert torch.allclose(d, hand(ref, x, SIGMAS), rtol=0, atol=1e-12)
        # the raw network: learn_sigma's first C channels
        assert torch.equal(prior.network(x, SIGMAS), ref(x, SIGMAS)[:, :3])


def test_edm_vp_precond_is_the_vp_continuous_view_of_the_bare_adm_file(tmp_path, adm):
    """DAPS's pipeline: the bare guided-diffusion file (layout adm) in VPPrecond == UNetPrior in vp_continuous."""
    path = save({k: v.clone() for k, v in adm.state_dict().items()}, tmp_path / "ffhq_like.pt")
    edm = EDMPrior(str(path), arch=TINY_ADM, precond="vp", layout="adm", dtype="float64")
    unet = UNetPrior(str(path), arch=TINY_ADM, dtype="float64", dialect="vp_continuous")
    x = x_like(edm.shape)
    with torch.no_grad():
        assert torch.allclose(edm.denoise(x, SIGMAS), unet.denoise(x, SIGMAS), rtol=0, atol=1e-12)
        assert torch.allclose(edm.denoise(x, SIGMAS), hand_vp(adm.to(F64), x, SIGMAS), rtol=0, atol=1e-12)
    assert FORMAT_OF_WEIGHTS["dps_ffhq256"] == ("dps_ffhq256", "vp", "adm")
    assert FORMAT_OF_WEIGHTS["inversebench_ffhq256"] == ("dps_ffhq256", "vp", "wrapped")


# ------------------------------------------------------------------------------------------ EDM: strict keys
def test_edm_wrapped_refuses_missing_unexpected_misshaped_and_bare_keys(tmp_path, adm):
    sd = wrapped_sd(adm)
    kw = dict(arch=TINY_ADM, precond="edm", layout="wrapped")
    gone = "model.out.2.weight"
    miss = {k: v for k, v in sd.items() if k != gone}
    with pytest.raises(StateDictMismatchError, match=r"missing keys: model\.out\.2\.weight \(1\)") as e:
        EDMPrior(str(save(miss, tmp_path / "miss.pt", "ema")), **kw)
    assert "strip that prefix" not in str(e.value)  # the 'model.' prefix is this format's own
    with pytest.raises(StateDictMismatchError, match=r"unexpected keys: model\.sigma_extra \(1\)"):
        EDMPrior(str(save({**sd, "model.sigma_extra": torch.zeros(1)}, tmp_path / "extra.pt", "ema")), **kw)
    bad = dict(sd)
    bad["model.time_embed.0.weight"] = torch.zeros(128, 31)
    with pytest.raises(StateDictMismatchError, match=r"shape mismatches: model\.time_embed\.0\.weight file \[128, 31\]"):
        EDMPrior(str(save(bad, tmp_path / "shape.safetensors")), **kw)
    bare = {k: v.clone() for k, v in adm.state_dict().items()}  # the guided-diffusion layout, not this one
    with pytest.raises(StateDictMismatchError, match=r"unexpected keys: input_blocks\.0\.0\.bias, ") as e:
        EDMPrior(str(save(bare, tmp_path / "bare.pt", "ema")), **kw)
    assert "under 'model.'" in str(e.value)
    with pytest.raises(CheckpointError, match=r"none of the entries \['ema', 'net'\].*'opt'"):
        EDMPrior(str(save(sd, tmp_path / "opt.pt", "opt")), **kw)


def test_edm_wrapped_refuses_code_in_the_pickle(tmp_path, adm):
    class Payload:
        def __reduce__(self):
            return (print, ("executed",))

    torch.save({"ema": wrapped_sd(adm), "args": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UnsafeCheckpointError, match="refusing to unpickle"):
        EDMPrior(str(tmp_path / "evil.pt"), arch=TINY_ADM, precond="vp", layout="wrapped")


def test_edm_options_are_checked(tmp_path, adm):
    path = save(wrapped_sd(adm), tmp_path / "w.pt", "ema")
    with pytest.raises(ValueError, match="precond must be one of edm, vp"):
        EDMPrior(str(path), arch=TINY_ADM, precond="ve", layout="wrapped")
    with pytest.raises(ValueError, match="layout must be one of wrapped, adm"):
        EDMPrior(str(path), arch=TINY_ADM, precond="vp", layout="pkl")


# ------------------------------------------------------------------------------------------ flow
def hand_flow(net, x_e, sigma):
    """Our flow dialect (noise at t = 1): x = (1 - t) x_e, D = x - t v_ours; PnP-Flow's network has data at its time 1
    (pnpflow/train_flow_matching.py:104-106), so v_ours = -v_theirs at time 1 - t."""
    b = (-1, 1, 1, 1)
    t = sigma / (1 + sigma)
    x = (1 - t).view(b) * x_e
    v_ours = -net(x, 1 - t)
    return x - t.view(b) * v_ours


@pytest.mark.parametrize("fmt", ["model_final.pt", "model_final.safetensors"])
def test_flow_format_loads_strictly_and_converts_time_and_sign(tmp_path, velocity_net, fmt):
    path = save({k: v.clone() for k, v in velocity_net.state_dict().items()}, tmp_path / fmt)
    prior = FlowPrior(str(path), arch=TINY_FLOW, dtype="float64")
    assert prior.shape == (3, 16, 16) and prior.dialect == "flow"
    ref = velocity_net.to(F64)
    x = x_like(prior.shape)
    with torch.no_grad():
        d = prior.denoise(x, SIGMAS)
        assert d.shape == x.shape
        assert torch.allclose(d, hand_flow(ref, x, SIGMAS), rtol=0, atol=1e-12)
        # PnP-Flow's own denoiser x + (1 - t') v at its time t' (pnpflow/methods/pnp_flow.py:50-52), same state
        tp = 1 / (1 + SIGMAS)
        z = x * tp.view(-1, 1, 1, 1)
        assert torch.allclose(d, z + (1 - tp).view(-1, 1, 1, 1) * ref(z, tp), rtol=0, atol=1e-12)


def test_flow_refuses_missing_unexpected_and_misshaped_keys(tmp_path, velocity_net):
    sd = {k: v.clone() for k, v in velocity_net.state_dict().items()}
    gone = "down_modules.0.0a_0a_block.temb_proj.weight"
    assert gone in sd and "temb_net.main.0.weight" in sd and "up_modules.0.1b_upsample.up_conv.weight" in sd
    with pytest.raises(StateDictMismatchError, match=rf"missing keys: {gone.replace('.', '[.]')} \(1\)"):
        FlowPrior(str(save({k: v for k, v in sd.items() if k != gone}, tmp_path / "m.pt")), arch=TINY_FLOW)
    with pytest.raises(StateDictMismatchError, match=r"unexpected keys: temb_net\.main\.1\.weight \(1\)"):
        FlowPrior(str(save({**sd, "temb_net.main.1.weight": torch.zeros(3)}, tmp_path / "u.pt")), arch=TINY_FLOW)
    bad = {**sd, "begin_conv.weight": torch.zeros(32, 1, 3, 3)}
    with pytest.raises(StateDictMismatchError, match=r"shape mismatches: begin_conv\.weight file \[32, 1, 3, 3\]"):
        FlowPrior(str(save(bad, tmp_path / "s.safetensors")), arch=TINY_FLOW)
    with pytest.raises(StateDictMismatchError, match="strip that prefix"):  # saved from a wrapper: refused, named
        FlowPrior(str(save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "ddp.pt")), arch=TINY_FLOW)


def test_flow_published_architectures():
    """PnP-Flow pnpflow/utils.py:171-179: ch 32, ch_mult (1, 2, 4, 8), 6 blocks, attention at 16 and 8."""
    with torch.device("meta"):
        celeba, afhq = DDPMUNet(PNPFLOW_CELEBA), DDPMUNet(PNPFLOW_AFHQ_CAT)
    assert (PNPFLOW_CELEBA.image_size, PNPFLOW_AFHQ_CAT.image_size) == (128, 256)
    assert sum(p.numel() for p in celeba.parameters()) == 34_473_667
    assert sum(p.numel() for p in afhq.parameters()) == 31_045_827  # 256 px: no level reaches 16 px, mid only
    assert "down_modules.3.3a_0b_attn.attn_q.weight" in celeba.state_dict()
    assert not any("b_attn" in k for k in afhq.state_dict())


# ------------------------------------------------------------------------------------------ grid protocol
def eps_from_d(prior, x_t, t):
    s = prior.schedule.sigma_at(torch.as_tensor(t)).to(F64)
    x_e = x_t * torch.sqrt(1 + s * s).view(-1, 1, 1, 1)
    return (x_e - prior.denoise(x_e, s)) / s.view(-1, 1, 1, 1)


@pytest.mark.parametrize("kind", ["edm", "vp", "flow"])
@pytest.mark.parametrize("dialect", ["vp_discrete", "native"])
def test_grid_protocol_is_the_conversion_of_d_at_sigma_t(tmp_path, adm, velocity_net, kind, dialect):
    if kind == "flow":
        path = save({k: v.clone() for k, v in velocity_net.state_dict().items()}, tmp_path / "f.pt")
        prior = FlowPrior(str(path), arch=TINY_FLOW, dtype="float64", **({} if dialect == "native" else {"dialect": dialect}))
    else:
        path = save(wrapped_sd(adm), tmp_path / "e.pt", "ema")
        prior = EDMPrior(str(path), arch=TINY_ADM, precond=kind, layout="wrapped", dtype="float64",
                         **({} if dialect == "native" else {"dialect": dialect}))
    t = torch.tensor([0, 37, 500, 999])
    x_t = x_like(prior.shape, seed=5, batch=4)
    with torch.no_grad():
        eps = prior.eps(x_t, t)
        ref = eps_from_d(prior, x_t, t)
        assert torch.allclose(eps, ref, rtol=0, atol=1e-10), (eps - ref).abs().max()
        assert torch.allclose(prior.eps(x_t[2:3], 500), ref[2:3], rtol=0, atol=1e-10)  # an int t
        x0 = prior.x0(x_t, t)
        a = prior.alpha_bar(t, x_t).view(-1, 1, 1, 1)
        assert torch.allclose(x0 * a.sqrt(), x_t - (1 - a).sqrt() * ref, rtol=0, atol=1e-10)
    if kind == "vp":  # the VPPrecond network predicts epsilon: the grid protocol returns it
        s = prior.schedule.sigma_at(t).to(F64)
        tau = ((0.01 + 2 * 19.9 * torch.log1p(s * s)).sqrt() - 0.1) / 19.9
        assert torch.allclose(eps, adm.to(F64)(x_t, 999 * tau)[:, :3], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------ registry, presets
@pytest.fixture
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("REDDIFF_HOME", str(tmp_path / "home"))
    for spec in W.REGISTRY.values():
        if spec.env:
            monkeypatch.delenv(spec.env, raising=False)
    return tmp_path / "home"


def test_weights_status_lists_the_new_entries(home, capsys):
    from reddiff import cli

    assert cli.main(["weights", "status", "--json"]) == 0
    rows = {r["name"]: r for r in __import__("json").loads(capsys.readouterr().out)}
    expect = {"inversebench_ffhq256": "ffhq256.pt", "pnpflow_celeba": "pnpflow/celeba/ot/model_final.pt",
              "pnpflow_afhq_cat": "pnpflow/afhq_cat/ot/model_final.pt"}
    for name, rel in expect.items():
        assert rows[name]["state"] == "missing" and rows[name]["path"] == str(home / rel)
        assert rows[name]["used_by"] == f"prior={name}" and (ROOT / "conf" / "prior" / f"{name}.yaml").is_file()
        spec = W.REGISTRY[name]
        assert spec.sha256 is None and spec.url is None and spec.manual  # no public hash, no direct download
    f = home / expect["pnpflow_celeba"]
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x")
    assert cli.main(["weights", "status"]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("pnpflow_celeba") and "present (no pinned hash)" in line for line in out.splitlines())
    assert "Google Drive file 1FpD3cYpgtM8-KJ3Qk48fcjtr1Ne_IMOF" in W.REGISTRY["pnpflow_afhq_cat"].instructions()
    assert "releases/tag/diffusion-prior" in W.REGISTRY["inversebench_ffhq256"].instructions()


@pytest.mark.parametrize("name", NEW)
def test_preset_with_the_file_absent_gives_the_exact_missing_line(home, name):
    from hydra.utils import instantiate

    from reddiff.run.experiment import UserError, build, unwrap_instantiation_error

    node = OmegaConf.create({"device": "cpu", "prior": OmegaConf.load(ROOT / "conf" / "prior" / f"{name}.yaml")}).prior
    msg = W.REGISTRY[name].missing_message()
    assert "\n" not in msg and str(home) in msg and f"reddiff weights fetch {name}" in msg
    with pytest.raises(Exception) as e:
        instantiate(node)
    assert isinstance(unwrap_instantiation_error(e.value), W.MissingWeightsError)
    assert str(unwrap_instantiation_error(e.value)) == msg
    with pytest.raises(UserError) as e:
        build(node, f"prior={name}")
    assert str(e.value) == f"prior={name}: {msg}"
    with pytest.raises(W.MissingWeightsError) as e:
        (EDMPrior if name.startswith("inversebench") else FlowPrior)(name)
    assert str(e.value) == msg


@pytest.mark.parametrize("name,cls", [("inversebench_ffhq256", EDMPrior), ("pnpflow_celeba", FlowPrior),
                                      ("pnpflow_afhq_cat", FlowPrior)])
def test_preset_keys_and_registered_file_load(home, monkeypatch, tmp_path, adm, velocity_net, name, cls):
    import inspect

    from hydra.utils import instantiate

    cfg = OmegaConf.load(ROOT / "conf" / "prior" / f"{name}.yaml")
    assert cfg._target_ == f"{cls.__module__}.{cls.__name__}" and cfg.weights == name and cfg.verify is True
    assert set(cfg) - {"_target_"} <= set(inspect.signature(cls.__init__).parameters)
    assert cfg.dialect == ("edm" if cls is EDMPrior else "flow")
    # the registered name finds a file placed by the user (env override) in the published layout, strictly loaded
    if cls is EDMPrior:
        f, arch = save(wrapped_sd(adm), tmp_path / "ffhq256.pt", "ema"), dict(TINY_ADM.__dict__)
    else:
        f, arch = save({k: v.clone() for k, v in velocity_net.state_dict().items()}, tmp_path / "mf.pt"), \
            dict(TINY_FLOW.__dict__)
    monkeypatch.setenv(W.REGISTRY[name].env, str(f))
    node = OmegaConf.create({"device": "cpu", "prior": cfg}).prior
    node.arch = {k: list(v) if isinstance(v, tuple) else v for k, v in arch.items()}
    prior = instantiate(node)
    assert isinstance(prior, cls) and prior.name == name and prior.shape == (3, 16, 16)
    if cls is EDMPrior:
        assert (prior.precond, prior.layout) == ("vp", "wrapped")
    with torch.no_grad():
        out = prior.denoise(torch.randn(2, 3, 16, 16), 0.8)
    assert out.shape == (2, 3, 16, 16) and torch.isfinite(out).all() and prior.nfe == 1


# ------------------------------------------------------------------------------------------ real files (when present)
@pytest.mark.weights
@pytest.mark.parametrize("name,cls,side", [("inversebench_ffhq256", EDMPrior, 256), ("pnpflow_celeba", FlowPrior, 128),
                                           ("pnpflow_afhq_cat", FlowPrior, 256)])
def test_published_checkpoint_loads_strictly(name, cls, side):
    if W.REGISTRY[name].find() is None:
        pytest.skip(f"{name} not in the cache: {W.REGISTRY[name].missing_message()}")
    prior = cls(name)
    assert prior.shape == (3, side, side)
    x = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eps = prior.eps(x, 999)
    assert eps.shape == x.shape and torch.isfinite(eps).all()
    # at t = T-1 the VP state is almost pure noise, so any trained model's epsilon is almost x_t itself
    assert torch.nn.functional.cosine_similarity(eps.flatten(), x.flatten(), dim=0) > 0.9
