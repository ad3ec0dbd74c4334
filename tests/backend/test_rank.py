"""rank: the similarity matrix and both rankings against a direct computation; embed."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from backend.tasks.rank import embed, rank
from shared_protocol import ErrorCode, ProtocolError

TEXTS = ["a harbour with many boats", "an airport", "dense forest"]


def _no_progress(p, m=""):
    pass


def _direct(tiny, tiles, texts):
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).float() / 255
    x = (x - torch.tensor(tiny.mean).view(1, 3, 1, 1)) / torch.tensor(tiny.std).view(1, 3, 1, 1)
    with torch.no_grad():
        img = F.normalize(tiny.model.encode_image(x), dim=-1)
        txt = F.normalize(tiny.model.encode_text(tiny.tokenizer(texts)), dim=-1)
    return (img @ txt.T).numpy()


def test_similarity_and_rankings_both_ways(engine, tiny, rng):
    tiles = rng.integers(0, 256, (7, 32, 32, 3), dtype=np.uint8)
    result, arrays = rank(engine, {"texts": TEXTS, "top_k": 4}, {"images": tiles}, _no_progress)
    sim = _direct(tiny, tiles, TEXTS)
    np.testing.assert_allclose(arrays["similarity"], sim, atol=1e-5)
    for q, ranks in enumerate(result["by_query"]):
        assert [r["index"] for r in ranks] == list(np.argsort(-sim[:, q], kind="stable")[:4])
        assert [r["score"] for r in ranks] == sorted((r["score"] for r in ranks), reverse=True)
    for i, ranks in enumerate(result["by_image"]):
        assert [r["index"] for r in ranks] == list(np.argsort(-sim[i], kind="stable")[:3])  # k capped at 3
    assert result["queries"][0] == {"kind": "text", "text": TEXTS[0]}


def test_image_queries_rank_the_same_tile_first(engine, rng):
    tiles = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    result, arrays = rank(engine, {"texts": None, "top_k": 1}, {"images": tiles, "query_images": tiles[[3, 1]]},
                          _no_progress)
    assert [r[0]["index"] for r in result["by_query"]] == [3, 1]
    assert arrays["similarity"][3, 0] == pytest.approx(1.0, abs=1e-5)


def test_rank_needs_queries(engine):
    with pytest.raises(ProtocolError) as e:
        rank(engine, {"texts": [], "top_k": 1}, {"images": np.zeros((1, 8, 8, 3), np.uint8)}, _no_progress)
    assert e.value.code == ErrorCode.BAD_PARAMS


def test_embed(engine, tiny, rng):
    tiles = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    result, arrays = embed(engine, {"texts": TEXTS, "normalize": True}, {"images": tiles}, _no_progress)
    assert arrays["image_embeddings"].shape == (3, 32) and arrays["text_embeddings"].shape == (3, 32)
    np.testing.assert_allclose(arrays["image_embeddings"] @ arrays["text_embeddings"].T,
                               _direct(tiny, tiles, TEXTS), atol=1e-5)
    _, raw = embed(engine, {"texts": TEXTS, "normalize": False}, {}, _no_progress)
    assert not np.allclose(np.linalg.norm(raw["text_embeddings"], axis=1), 1.0)


@pytest.mark.parametrize("arch", ["tiny", "tiny-quickgelu"])
def test_trimmed_text_encoder_equals_open_clip(arch):
    from backend.models.text_encoder import trimmed_text_encoder
    from backend.models import load_model
    torch.manual_seed(2)
    loaded = load_model(arch, random_weights=True, device="cpu")
    fast = trimmed_text_encoder(loaded.model)
    assert fast is not None
    tokens = loaded.tokenizer(["a", "a harbour with many boats", "a remote sensing image of the dense residential."])
    with torch.no_grad():
        torch.testing.assert_close(fast(tokens), loaded.model.encode_text(tokens), atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(fast(tokens[:1]), loaded.model.encode_text(tokens[:1]), atol=2e-5, rtol=1e-5)
