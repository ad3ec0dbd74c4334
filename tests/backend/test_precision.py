"""Precision: what --precision resolves to per device, and the CPU bf16 path (a bf16 copy of the base model)."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.cli import main as cli_main
from backend.engine import Engine, EngineConfig
from backend.models.precision import cpuinfo_field, native_bf16_cpu, resolve_precision
from backend.models.preprocess import preprocess_batch
from backend.tasks.classify import classify

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
X86 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9454 48-Core Processor\n"
       "flags\t\t: fpu sse2 avx2 avx512f {extra}\n\nprocessor\t: 1\nflags\t\t: fpu avx512_bf16\n")
ARM = "processor\t: 0\nFeatures\t: fp asimd {extra}\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("text,expected", [
    (X86.format(extra="avx512_bf16 avx512_vnni"), True),
    (X86.format(extra="amx_bf16 amx_tile"), True),
    (X86.format(extra="avx512_vnni"), False),  # AVX-512 without BF16: bf16 is emulated, slower than fp32
    (ARM.format(extra="bf16 i8mm"), True),
    (ARM.format(extra="sve"), False),
    ("", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, text, expected):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert native_bf16_cpu(str(path)) is expected


def test_native_bf16_is_no_without_cpuinfo(tmp_path):
    assert native_bf16_cpu(str(tmp_path / "missing")) is False


def test_the_cpu_model_name_is_read_from_cpuinfo(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(X86.format(extra=""))
    assert cpuinfo_field(("model name",), str(path)) == "AMD EPYC 9454 48-Core Processor"
    assert cpuinfo_field(("no such key",), str(path)) is None
    assert cpuinfo_field(("model name",), str(tmp_path / "missing")) is None


def test_precision_resolution(monkeypatch):
    assert resolve_precision("fp32", CPU) == resolve_precision("fp32", CUDA)
    fp32 = resolve_precision("fp32", CPU)
    assert (fp32.name, fp32.autocast, fp32.weights) == ("fp32", None, torch.float32)
    for native, name in ((True, "bf16"), (False, "fp32")):
        p = resolve_precision("auto", CPU, cpu_bf16=native)
        assert (p.name, p.autocast, p.weights) == (name, None, {"bf16": torch.bfloat16, "fp32": torch.float32}[name])
    p = resolve_precision("bf16", CPU, cpu_bf16=False)  # asked for: honoured even where it is slow
    assert (p.autocast, p.weights) == (None, torch.bfloat16)
    with pytest.raises(ValueError, match="fp16 runs on CUDA only"):
        resolve_precision("fp16", CPU)
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        resolve_precision("int4", CPU)
    # CUDA autocasts and keeps fp32 weights; auto falls back to fp16 where bf16 is missing
    for supported, dtype in ((True, torch.bfloat16), (False, torch.float16)):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, supported=supported, **k: supported)
        p = resolve_precision("auto", CUDA)
        assert (p.autocast, p.weights) == (dtype, torch.float32)
    assert resolve_precision("fp16", CUDA).autocast == torch.float16


def test_int8_is_cpu_only_and_never_picked_by_auto(monkeypatch):
    p = resolve_precision("int8", CPU)
    assert (p.name, p.autocast, p.weights, p.int8) == ("int8", None, torch.float32, True)  # fp32 inputs
    for native in (True, False):
        assert not resolve_precision("auto", CPU, cpu_bf16=native).int8
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, supported=supported, **k: supported)
        assert not resolve_precision("auto", CUDA).int8
    for device in (CUDA, torch.device("mps")):
        with pytest.raises(ValueError, match=f"int8 runs on a CPU only .*no {device.type} kernels.*--device cpu"):
            resolve_precision("int8", device)
    assert not any(resolve_precision(n, CPU).int8 for n in ("fp32", "bf16"))


def test_the_commands_offer_the_one_list_of_precisions():
    from backend.cli import build_parser
    from backend.models.precision import PRECISIONS
    assert "int8" in PRECISIONS
    parser = build_parser()
    for argv in (["serve"], ["index", "build", "--index", "x", "r.tif"]):
        sub = parser._subparsers._group_actions[0].choices[argv[0]]
        if len(argv) > 2:
            sub = sub._subparsers._group_actions[0].choices[argv[1]]
        (action,) = [a for a in sub._actions if "--precision" in a.option_strings]
        assert action.choices is PRECISIONS


@pytest.fixture
def bf16_engine(tiny):
    return Engine(tiny, EngineConfig(batch_size=8, precision="bf16", cache_bytes=0))


def test_cpu_bf16_runs_a_bf16_copy_and_leaves_the_loaded_model_alone(tiny, bf16_engine):
    assert bf16_engine.precision.name == "bf16" and bf16_engine.precision.autocast is None
    assert bf16_engine.adapter_precision == "fp32"  # adapters are not cast
    assert bf16_engine.model_for(None) is bf16_engine.base_model is not tiny.model
    assert {p.dtype for p in bf16_engine.base_model.parameters()} == {torch.bfloat16}
    assert not any(p.requires_grad for p in bf16_engine.base_model.parameters())
    assert {p.dtype for p in tiny.model.parameters()} == {torch.float32}
    shared = {p.data_ptr() for p in tiny.model.parameters()}
    assert not shared & {p.data_ptr() for p in bf16_engine.base_model.parameters()}
    assert Engine(tiny, EngineConfig(precision="fp32")).base_model is tiny.model


def test_cpu_bf16_image_embeddings_equal_the_cast_model_and_are_close_to_fp32(tiny, bf16_engine, engine, rng):
    tiles = rng.integers(0, 256, (10, 32, 32, 3), dtype=np.uint8)
    got = bf16_engine.encode_images(tiles)
    assert got.dtype == torch.float32
    x = preprocess_batch(tiles, tiny)
    with torch.inference_mode():  # independent: open_clip's encode_image on a model cast with .to()
        cast = bf16_engine.base_model  # (same tensors as tiny.model.to(bf16) would give; checked below)
        for p, q in zip(cast.parameters(), tiny.model.parameters()):
            assert torch.equal(p, q.detach().to(torch.bfloat16))
        ref = F.normalize(cast.encode_image(x[:8].bfloat16()).float(), dim=-1)
        ref = torch.cat([ref, F.normalize(cast.encode_image(x[8:].bfloat16()).float(), dim=-1)])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)
    fp32 = engine.encode_images(tiles)
    assert float(F.cosine_similarity(got, fp32).min()) > 0.995
    assert float((got - fp32).abs().max()) > 1e-4  # it really ran in bf16


def test_cpu_bf16_texts_and_classify_stay_close_to_fp32(bf16_engine, engine, rng):
    texts = ["a harbour with many boats", "dense forest", "an airport"]
    a, b = bf16_engine.encode_texts(texts), engine.encode_texts(texts)
    assert float(F.cosine_similarity(a, b).min()) > 0.995
    tiles = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    params = {"classes": ["red", "green", "blue"], "templates": "simple"}
    _, p16 = classify(bf16_engine, dict(params), {"tiles": tiles}, lambda p, m: None)
    _, p32 = classify(engine, dict(params), {"tiles": tiles}, lambda p, m: None)
    # probabilities are softmax(100 cos): bf16 moves them by a few points (as CUDA's bf16 autocast does), so
    # compare the cosine gaps between classes, log(p_c / p_0) / 100, which bf16 moves by ~1e-3
    gaps = [np.log(p["probs"] / p["probs"][:, :1]) / 100 for p in (p16, p32)]
    assert np.abs(gaps[0] - gaps[1]).max() < 0.01
    assert (p16["probs"].argmax(1) == p32["probs"].argmax(1)).mean() >= 0.8


def test_serve_refuses_fp16_on_cpu_with_a_clear_reason(capsys):
    rc = cli_main(["serve", "--model", "tiny", "--random-weights", "--device", "cpu", "--precision", "fp16",
                   "--bind", "tcp://127.0.0.1:0"])
    assert rc == 2
    assert "cannot start (bad_config): fp16 runs on CUDA only" in capsys.readouterr().err


def test_warm_up_runs_every_path_and_caches_nothing(tiny, monkeypatch):
    engine = Engine(tiny, EngineConfig(precision="fp32", cache_bytes=64 << 20))
    calls = []
    for name in ("encode_windows", "encode_texts"):
        original = getattr(engine, name)
        monkeypatch.setattr(engine, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    assert engine.warm_up() > 0
    assert calls == ["encode_windows", "encode_texts"]
    assert engine.cache.stats()["entries"] == 0
