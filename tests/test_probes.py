"""The methods as objects (vqt_cache/methods/) and the two probes that read the store's probe arrays: the attentive
probe and DINOv2's linear protocol (linear-multi). Each is exact against its reference, as VQT is."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vqt_cache import methods
from vqt_cache.methods.base import Inputs, Method
from vqt_cache.methods.linear_multi import METHOD as LINEAR_MULTI

from conftest import TINY_EXTRACT, error_line, images_for, run_cli, tiny_backbone

DEEP = {**TINY_EXTRACT["model_kwargs"], "depth": 4}  # linear-multi's n = 4 needs four blocks


def _extract_args(out: str, dtype: str, *options: str) -> list[str]:
    return [
        "extract",
        "--backbone",
        TINY_EXTRACT["backbone"],
        "--weights",
        "random",
        *(f"--model-arg={k}={v}" for k, v in DEEP.items()),
        "--dataset",
        "digits",
        "--splits",
        "train800,val200",
        "--layout",
        "hidden",
        "--dtype",
        dtype,
        "--workers",
        "0",
        "--out",
        out,
        *options,
    ]


@pytest.fixture(scope="module")
def probe_store(tmp_path_factory) -> str:
    """digits through a four-block tiny ViT, hidden float32, with probe arrays."""
    out = str(tmp_path_factory.mktemp("probes") / "digits.zarr")
    code, text = run_cli(*_extract_args(out, "float32", "--probes"))
    assert code == 0, text
    return out


@pytest.mark.parametrize("variant", ["cls", "registers", "deit_distilled", "gap_fc_norm", "pre_norm"])
def test_linear_multi_features_equal_dinov2s_from_forward_intermediates(variant):
    """dinov2's create_linear_input over timm's forward_intermediates(norm=True): the class tokens of the last n
    blocks, then the mean of the last block's patch tokens."""
    backbone = tiny_backbone(variant)
    images = images_for(backbone)
    probes: dict[str, torch.Tensor] = {}
    final, _ = backbone.forward_cache(images, probes=probes)
    for n in (1, backbone.depth):
        ours = LINEAR_MULTI.features(n, None, Inputs(final, **probes))
        blocks = backbone.model.forward_intermediates(
            images, indices=n, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
        )
        reference = torch.cat([prefix[:, 0] for _, prefix in blocks] + [blocks[-1][0].mean(dim=1)], dim=-1)
        assert ours.shape == (len(images), backbone.dim * (n + 1))
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)


def test_both_probes_cached_equal_live_and_the_store_checks_their_arrays(probe_store, tmp_path):
    """Trained from the store's probe arrays, evaluated from them and live from the images: the same logits."""
    from vqt_cache.batches import CachedSplit
    from vqt_cache.config import RunSpec, TrainConfig
    from vqt_cache.evaluation import cached_logits, live_logits, load_runs
    from vqt_cache.training import train

    specs = (RunSpec("attentive", 0, 1.0, 1e-3, 3), RunSpec("linear-multi", 4, 0.5, 0.0, 3))
    cfg = TrainConfig(
        store=probe_store, runs=specs, epochs=2, warmup_epochs=1, precision="float32", out=str(tmp_path / "runs")
    )
    results = train(cfg)
    assert [r.name for r in results] == ["attentive-lr1-wd0.001-seed3", "linear-multi-n4-lr0.5-wd0-seed3"]
    dirs = [r.dir for r in results]
    _, store, backbone, model = load_runs(dirs)
    cached, labels = cached_logits(model, CachedSplit(store.split("val200"), **model.reads()))
    live, live_labels = live_logits(model, backbone, store, "val200", dirs, None, 64, torch.device("cpu"), 0, None)
    assert torch.equal(labels, live_labels)
    for c, v in zip(cached, live, strict=True):  # 1e-4, relative to logits that reach 100s after training
        torch.testing.assert_close(c, v, rtol=1e-5, atol=1e-4)
        assert torch.equal(c.argmax(1), v.argmax(1))

    # an altered class token is caught by its shard's checksum
    import zarr

    group = zarr.open_group(probe_store, mode="r+")
    saved = group["images/class_tokens"][0]
    group["images/class_tokens"][0] = saved + 1
    try:
        code, out = run_cli("verify", probe_store)
        assert code != 0 and "differs from the checksum" in out, out
    finally:
        group["images/class_tokens"][0] = saved


def test_a_store_without_probe_arrays_refuses_the_probes_in_one_sentence(tiny_store, tmp_path):
    out = tmp_path / "runs"
    args = ["--store", tiny_store, "--method", "attentive", "--out", str(out), "--epochs", "2", "--warmup-epochs", "1"]
    code, text = run_cli("train", *args)
    line = error_line(code, text)
    assert "holds no probe arrays" in line and "extract with --probes into another --out" in line
    assert not out.exists()


def test_a_probe_store_says_so_and_is_not_resumed_without_probes(probe_store):
    import json

    code, text = run_cli("info", probe_store, "--json")
    assert code == 0 and json.loads(text)["probes"] is True, text
    code, text = run_cli(*_extract_args(probe_store, "float32"))
    assert "was extracted with --probes: pass --probes to add to it" in error_line(code, text)


def test_int8_probe_tokens_stay_within_the_quantization_bound(probe_store, tmp_path):
    """int8 keeps the patch tokens to half a step of their group's scale; the class tokens and patch mean are
    float32 in every dtype, so linear-multi reads the same values from both stores."""
    import zarr

    out = str(tmp_path / "int8.zarr")
    code, text = run_cli(*_extract_args(out, "int8", "--probes"))
    assert code == 0, text
    exact, packed = zarr.open_group(probe_store, mode="r")["images"], zarr.open_group(out, mode="r")["images"]
    for name in ("class_tokens", "patch_mean"):
        np.testing.assert_array_equal(exact[name][:64], packed[name][:64])
    tokens, scales = packed["tokens"][:64].astype(np.float32), packed["tokens_scale"][:64].astype(np.float32)
    group = tokens.shape[-1] // scales.shape[-1]
    widened = (tokens.reshape(*scales.shape, group) * scales[..., None]).reshape(tokens.shape)
    error = np.abs(widened - exact["tokens"][:64]).reshape(*scales.shape, group).max(axis=-1)
    assert (error <= 0.5 * scales + 1e-6).all()


class Doubled(Method):
    """A toy method: a linear head on 2·f_0 (not normalised), with nothing but its own module and a registry line."""

    name = "toy-doubled"
    label = "toy (2·f_0)"

    def features(self, size, probe, inputs):
        return 2 * inputs.final


def test_a_method_added_through_the_registry_alone_trains_evaluates_and_is_named(tiny_store, tmp_path):
    from vqt_cache.config import RunSpec, TrainConfig
    from vqt_cache.evaluation import evaluate
    from vqt_cache.training import train

    methods.register(Doubled())
    assert "toy-doubled" in methods.names() and "toy-doubled" in methods.describe()
    spec = RunSpec("toy-doubled", 5, 0.5, 0.0, 1)
    assert spec.queries == 0 and spec.name == "toy-doubled-lr0.5-wd0-seed1"
    [result] = train(TrainConfig(store=tiny_store, runs=(spec,), epochs=1, warmup_epochs=0, out=str(tmp_path / "r")))
    [evaluation] = evaluate([result.dir], "val200")
    assert evaluation.top1 == result.final["top1"]
    with pytest.raises(Exception, match="built in"):
        methods.register(type("Shadow", (Doubled,), {"name": "vqt"})())


def test_unknown_methods_are_named_from_the_catalog():
    code, text = run_cli("train", "--method", "probe", "--store", "nowhere.zarr")
    line = error_line(code, text)
    assert "unknown method 'probe'" in line and all(name in line for name in methods.CATALOG)


def test_the_pooled_features_are_unchanged_by_the_method_objects():
    """The Head2Toe-style baseline's features, as `heads.pooled_features` defines them."""
    final, means = torch.randn(4, 8), torch.randn(4, 3, 8)
    ours = methods.get("pooled").features(0, None, Inputs(final, means=means))
    reference = torch.cat([F.normalize(final, dim=-1), F.normalize(means, dim=-1).flatten(1)], dim=1)
    assert torch.equal(ours, reference)


@pytest.mark.parametrize("variant", ["cls", "registers", "pre_norm"])
def test_pooled_is_one_feature_on_a_kv_and_a_hidden_cache(variant):
    """Each layer's mean value vector: read from a kv cache, or made from a hidden cache's mean LN1 input by the
    block's own projection; and it is the mean of timm's own value vectors."""
    from vqt_cache.model import CachedVQT, RunParameters

    backbone = tiny_backbone(variant)
    images = images_for(backbone)
    features = {}
    for layout in ("kv", "hidden"):
        final, cache = backbone.forward_cache(images, layout=layout, layer_major=True)
        run = RunParameters("pooled", 0, backbone.depth, backbone.dim, 3, backbone.patch_size, 0.0)
        [features[layout]] = CachedVQT(backbone.blocks, [run], layout).eval().features(final, cache)
    torch.testing.assert_close(features["hidden"], features["kv"], rtol=0, atol=2e-6)
    D, L = backbone.dim, backbone.depth
    values = []  # timm's value vectors, captured at each attention's qkv projection
    hooks = [b.attn.qkv.register_forward_hook(lambda m, i, o: values.append(o[..., 2 * D :])) for b in backbone.blocks]
    with torch.no_grad():
        backbone.model.forward_features(images)
    for hook in hooks:
        hook.remove()
    reference = F.normalize(torch.stack([v.mean(dim=1) for v in values], dim=1), dim=-1).flatten(1)
    torch.testing.assert_close(features["kv"][:, D:], reference, rtol=0, atol=2e-6)
    assert features["kv"].shape == (len(images), D * (1 + L))


def test_linear_is_the_plain_probe_and_linear_norm_the_normalised_one():
    final = torch.randn(4, 8) * 5
    assert torch.equal(methods.get("linear").features(0, None, Inputs(final)), final)
    torch.testing.assert_close(methods.get("linear-norm").features(0, None, Inputs(final)), F.normalize(final, dim=-1))


def test_linear_multi_on_a_backbone_too_shallow_for_its_grid_is_one_sentence(tiny_store, tmp_path):
    out = tmp_path / "runs"
    args = ["--store", tiny_store, "--method", "linear-multi", "--out", str(out), "--epochs", "2"]
    line = error_line(*run_cli("train", *args, "--warmup-epochs", "1"))
    assert "linear-multi n=4 needs 4 blocks, but the backbone has 2: choose n <= 2 with --blocks" in line
    assert not out.exists()


def test_linear_multi_trains_the_n_the_user_chooses(probe_store, tmp_path):
    args = ["--store", probe_store, "--method", "linear-multi", "--epochs", "2", "--warmup-epochs", "1", "--json"]
    code, out = run_cli("train", *args, "--blocks", "2,3", "--eval-split", "none", "--out", str(tmp_path))
    assert code == 0, out
    assert [r["name"].split("-lr")[0] for r in json.loads(out)] == ["linear-multi-n2", "linear-multi-n3"]


def test_the_probes_resume_from_a_checkpoint_to_the_uninterrupted_result(probe_store, tmp_path):
    """A probe's own module and its optimizer state go into the checkpoint: a resumed run ends bit-identical."""
    import json
    from pathlib import Path

    from vqt_cache.config import RunSpec, TrainConfig
    from vqt_cache.training import train

    specs = (RunSpec("attentive", 0, 1.0, 1e-3, 5), RunSpec("linear-multi", 1, 0.5, 0.0, 5))

    def config(out):
        return TrainConfig(
            store=probe_store, runs=specs, epochs=4, warmup_epochs=1, checkpoint_every=2, train_split="val200",
            eval_split="none", out=str(out),
        )  # fmt: skip

    full = train(config(tmp_path / "full"))

    def interrupt(_label, step, _total):
        if step == 3 * 2 + 1:  # two steps per epoch: inside epoch 4, after the checkpoint of epoch 2
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(config(tmp_path / "resumed"), progress=interrupt)
    seen = []
    resumed = train(config(tmp_path / "resumed"), progress=lambda _l, step, _t: seen.append(step))
    assert seen[0] == 2 * 2  # continued after the checkpoint of epoch 2, not from scratch
    for a, b in zip(full, resumed, strict=True):
        assert (Path(a.dir) / "model.safetensors").read_bytes() == (Path(b.dir) / "model.safetensors").read_bytes()
        losses = [
            [e["train_loss"] for e in json.loads((Path(d) / "metrics.json").read_text())["epochs"]]
            for d in (a.dir, b.dir)
        ]
        assert losses[0] == losses[1]


# -- V-JEPA's attentive classifier, written here from its released code (facebookresearch/jepa:
# src/models/attentive_pooler.py AttentiveClassifier, AttentivePooler; src/models/utils/modules.py CrossAttention,
# CrossAttentionBlock, MLP), independently of vqt_cache.methods.attentive ------------------------------------------


class _JepaCrossAttention(torch.nn.Module):
    """Queries from q, keys and values from x, head-split; a `proj` is created (and initialised) but never used."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = torch.nn.Linear(dim, dim, bias=True)
        self.kv = torch.nn.Linear(dim, 2 * dim, bias=True)
        self.proj = torch.nn.Linear(dim, dim)  # defined by the released module, absent from its forward

    def forward(self, q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        B, n, C = q.shape
        N, h = x.shape[1], self.heads
        queries = self.q(q).reshape(B, n, h, C // h).permute(0, 2, 1, 3)
        keys, values = self.kv(x).reshape(B, N, 2, h, C // h).permute(2, 0, 3, 1, 4)
        weights = (queries @ keys.transpose(-2, -1) * (C // h) ** -0.5).softmax(dim=-1)
        return (weights @ values).transpose(1, 2).reshape(B, n, C)


class _JepaClassifier(torch.nn.Module):
    """AttentiveClassifier(depth=1, complete_block=True, qkv_bias=True, mlp_ratio=4): pooler, then a Linear."""

    def __init__(self, dim: int, heads: int, classes: int) -> None:
        super().__init__()
        self.query_tokens = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.norm1 = torch.nn.LayerNorm(dim)  # torch's default eps, as norm_layer=nn.LayerNorm gives
        self.xattn = _JepaCrossAttention(dim, heads)
        self.norm2 = torch.nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = torch.nn.Linear(dim, 4 * dim), torch.nn.GELU(), torch.nn.Linear(4 * dim, dim)
        torch.nn.init.trunc_normal_(self.query_tokens, std=0.02)
        for m in (self.xattn.q, self.xattn.kv, self.xattn.proj, self.fc1, self.fc2):  # the pooler's _init_weights
            torch.nn.init.trunc_normal_(m.weight, std=0.02)
            torch.nn.init.constant_(m.bias, 0)
        with torch.no_grad():  # _rescale_blocks, layer 1
            self.xattn.proj.weight.div_(2.0**0.5)
            self.fc2.weight.div_(2.0**0.5)
        self.linear = torch.nn.Linear(dim, classes)  # outside the pooler: torch's default initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.query_tokens.repeat(len(x), 1, 1)
        q = q + self.xattn(q, self.norm1(x))
        q = q + self.fc2(self.act(self.fc1(self.norm2(q))))
        return self.linear(q.squeeze(1))


@pytest.mark.parametrize("variant", ["cls", "registers"])
def test_the_attentive_probe_is_v_jepas_attentive_classifier(variant):
    """On the same weights, over a timm ViT's patch tokens (class and register tokens left out), the run's logits
    equal the reference classifier's; and the run's fresh initialisation follows the released one's rules."""
    from vqt_cache.model import RunParameters

    backbone = tiny_backbone(variant)
    images = images_for(backbone)
    probes: dict[str, torch.Tensor] = {}
    final, _ = backbone.forward_cache(images, probes=probes)
    [(patches, _)] = backbone.model.forward_intermediates(
        images, indices=1, norm=True, output_fmt="NLC", intermediates_only=True, return_prefix_tokens=True
    )
    torch.testing.assert_close(probes["tokens"], patches, rtol=0, atol=0)  # the probe's token set
    torch.manual_seed(0)
    reference = _JepaClassifier(backbone.dim, backbone.heads, 7)
    with torch.no_grad():  # moved off their initial scale, so a swapped or missing tensor shows
        for p in reference.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    run = RunParameters("attentive", 0, backbone.depth, backbone.dim, 7, backbone.patch_size, 0.0, heads=backbone.heads)
    mine = {"query": "query_tokens", "norm1": "norm1", "q": "xattn.q", "kv": "xattn.kv", "norm2": "norm2"}
    mine |= {"fc1": "fc1", "fc2": "fc2"}
    theirs = dict(reference.named_parameters())
    run.load_tensors(
        {"queries": run.queries.prompts, "head.weight": theirs["linear.weight"], "head.bias": theirs["linear.bias"]}
        | {
            f"probe.{name}": theirs[name.replace(prefix, mine[prefix], 1)]
            for name, _ in run.probe.named_parameters()
            for prefix in [name.rsplit(".", 1)[0]]
        }
    )
    run.eval()
    ours = run.head(run.features(Inputs(final, **probes)))
    torch.testing.assert_close(ours, reference(patches), rtol=0, atol=2e-6)
    assert {n for n, _ in run.probe.named_parameters()} == {
        f"{k}.{p}" if k != "query" else "query" for k in mine for p in ("weight", "bias")
    }
    # initialisation: LayerNorm eps, the head's bound, the block's std
    fresh = RunParameters("attentive", 0, 2, 64, 7, (16, 16), 0.0, seed=3, heads=4)
    assert fresh.probe.norm1.eps == fresh.probe.norm2.eps == 1e-5
    assert fresh.head.weight.abs().max() <= 64**-0.5 and fresh.head.bias.abs().max() <= 64**-0.5
    assert fresh.head.weight.std() > 0.8 * 64**-0.5 / 3**0.5  # uniform(+-1/sqrt(D)), not a narrow normal
    assert abs(fresh.probe.q.weight.std() - 0.02) < 0.002 and not fresh.probe.q.bias.any()
    assert abs(fresh.probe.fc2.weight.std() - 0.02 / 2**0.5) < 0.002


def test_a_run_of_the_earlier_attentive_probe_is_refused_not_reused():
    """Runs recorded before method versions are version 1; the attentive probe is version 2 (V-JEPA's as released)."""
    from vqt_cache.errors import VQTError
    from vqt_cache.model import RunParameters
    from vqt_cache.run_folder import ModelRecord

    table = {"method": "attentive", "queries": 0, "depth": 2, "dim": 64, "heads": 4, "num_classes": 3}
    table |= {"patch_size": [16, 16], "feature_dim": 64}
    record = lambda t: ModelRecord.from_json(t, Path("config.json"))  # noqa: E731
    assert RunParameters.from_record(record({**table, "version": 2})).method.name == "attentive"
    with pytest.raises(VQTError, match="version 1 of the attentive method"):
        RunParameters.from_record(record(table))  # no version recorded: version 1
    assert RunParameters.from_record(record({**table, "method": "vqt"})).method.name == "vqt"  # version 1 still


# --- each probe trains with its paper's recipe: the released training loops, written here from their code ---


def _dinov2_loop(run, batches, steps, lr, batch_size):
    """dinov2/eval/linear.py: SGD(momentum 0.9, weight_decay 0) at lr · batch / 256, CosineAnnealingLR(max_iter,
    eta_min 0) stepped after every update; the loss is the classifier's cross-entropy."""
    optimizer = torch.optim.SGD([{"params": list(run.parameters()), "lr": lr * batch_size / 256}], momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=0)
    for features, labels in batches:
        loss = F.cross_entropy(run.head(run.features(features)), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()


def _jepa_loop(run, batches, steps, lr, wd):
    """evals/image_classification_frozen/eval.py with its in1k config (warmup 0, start_lr = lr, final_lr 0) and
    init_opt's final_wd 1e-6: AdamW over two groups (no decay on biases and 1-D tensors), before each update
    WarmupCosineSchedule and CosineWDSchedule advance one step, then the gradient norm is clipped to 1."""
    named = list(run.named_parameters())
    decayed = [p for n, p in named if "bias" not in n and p.dim() != 1]
    excluded = [p for n, p in named if "bias" in n or p.dim() == 1]
    optimizer = torch.optim.AdamW([{"params": decayed}, {"params": excluded, "WD_exclude": True, "weight_decay": 0}])
    for step, (features, labels) in enumerate(batches, start=1):
        cosine = 0.5 * (1.0 + np.cos(np.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = max(0.0, lr * cosine)
            if not group.get("WD_exclude"):
                group["weight_decay"] = max(1e-6, 1e-6 + (wd - 1e-6) * cosine)
        loss = F.cross_entropy(run.head(run.features(features)), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(run.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize(("method", "loop"), [("linear", _dinov2_loop), ("attentive", _jepa_loop)])
def test_each_probe_trains_as_its_paper_does(probe_store, tmp_path, method, loop):
    """`train` with recipe own gives the parameters the paper's own loop gives from the same start on the same batches
    (linear: DINOv2's linear protocol; attentive: V-JEPA's probe), and recipe shared gives others."""
    from safetensors.torch import load_file

    from vqt_cache.batches import CachedSplit
    from vqt_cache.config import RunSpec, TrainConfig
    from vqt_cache.model import RunParameters
    from vqt_cache.store import open_store
    from vqt_cache.training import train

    epochs, batch_size, seed = 3, 100, 7
    specs = (RunSpec(method, seed=seed), RunSpec(method, seed=seed, recipe="shared"))
    cfg = TrainConfig(
        store=probe_store,
        runs=specs,
        epochs=epochs,
        warmup_epochs=1,
        batch_size=batch_size,
        eval_split="none",
        out=str(tmp_path),
        precision="float32",
    )
    own, shared = (load_file(f"{r.dir}/model.safetensors") for r in train(cfg))
    table = json.loads((tmp_path / specs[0].name / "config.json").read_text())["model"]
    run = RunParameters(
        method,
        0,
        table["depth"],
        table["dim"],
        table["num_classes"],
        tuple(table["patch_size"]),
        0.0,
        seed,
        table["heads"],
        specs[0].optimization.head_init,
    )
    start = {k: v.detach().clone() for k, v in run.tensors().items()}
    data = CachedSplit(
        open_store(probe_store).split("train800"),
        2**30,
        batch_size,
        torch.device("cpu"),
        table["num_classes"],
        dtype=torch.float32,
        cache=False,
        means=False,
        probes=True,
    )
    batches = [
        (Inputs(b.final, **b.probes), b.labels) for e in range(epochs) for b in data.batches(data.shuffled(seed, e))
    ]
    args = (specs[0].lr, batch_size) if method == "linear" else (specs[0].lr, specs[0].wd)
    loop(run, batches, len(batches), *args)
    for name, tensor in run.tensors().items():
        torch.testing.assert_close(own[name], tensor.detach(), rtol=1e-5, atol=1e-6, msg=name)
    assert any(not torch.equal(own[k], start[k]) for k in start)  # it trained
    assert any(not torch.allclose(shared[k], own[k], atol=1e-4) for k in own if own[k].numel())  # another recipe
