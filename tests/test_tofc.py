"""TOFC: DPC-KNN against a direct reference, exact range-coded round trips, rates, and bad input."""

from __future__ import annotations

import copy
import io
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from aiflow_fl.errors import AiflowError
from aiflow_fl.tofc.bitstream import decode_fp16, decode_symbols, decode_tokens, encode_fp16, encode_tokens
from aiflow_fl.tofc.entropy import CodecConfig, TofcCodec, balance_loss, laplace_bits
from aiflow_fl.tofc.merge import dpc_knn_clusters, dpc_knn_merge, merge_by_mean

pytestmark = pytest.mark.usefixtures("one_thread")


# ---- DPC-KNN: a direct, loop-by-loop reference of TCFormer's definitions -------------------------

def reference_dpc_knn(x: np.ndarray, n_c: int, k: int):
    """Densities, δ, centres, assignment and merged tokens of one image, written out with loops."""
    n, c = x.shape
    d = np.array([[math.sqrt(((x[i] - x[j]) ** 2).sum()) / math.sqrt(c) for j in range(n)] for i in range(n)])
    rho = np.array([math.exp(-np.mean(np.sort(d[i])[:k] ** 2)) + 1e-6 * i / n for i in range(n)])
    dmax = d.max()
    delta = np.array([min([d[i, j] for j in range(n) if rho[j] > rho[i]], default=dmax) for i in range(n)])
    score = rho * delta
    centres = list(np.argsort(-score, kind="stable")[:n_c])
    assign = np.array([int(np.argmin([d[centre, i] for centre in centres])) for i in range(n)])
    for cluster, centre in enumerate(centres):
        assign[centre] = cluster
    merged = np.stack([x[assign == cluster].mean(axis=0) for cluster in range(n_c)])
    return rho, delta, centres, assign, merged


@pytest.mark.parametrize("n,c,n_c,k", [(12, 5, 3, 3), (20, 8, 6, 5), (9, 3, 9, 4), (16, 4, 1, 5)])
def test_dpc_knn_matches_direct_reference(n, c, n_c, k):
    from aiflow_fl.tofc.merge import distance_to_denser, local_density, pairwise_distances

    gen = torch.Generator().manual_seed(n * 100 + c)
    # Clustered data so centres are well separated from the other scores (no near-ties).
    x = (torch.randn(2, n, c, generator=gen, dtype=torch.float64)
         + 3 * torch.randint(0, 3, (2, n, 1), generator=gen).double())
    assignment, centres = dpc_knn_clusters(x, n_c, k)
    merged = dpc_knn_merge(x, n_c, k)
    for b in range(2):
        rho, delta, ref_centres, ref_assign, ref_merged = reference_dpc_knn(x[b].numpy(), n_c, k)
        dist = pairwise_distances(x[b:b + 1])
        np.testing.assert_allclose(local_density(dist, k)[0].numpy(), rho, rtol=1e-9)
        np.testing.assert_allclose(distance_to_denser(dist, local_density(dist, k))[0].numpy(), delta, rtol=1e-9)
        assert centres[b].tolist() == [int(i) for i in ref_centres]
        assert assignment[b].tolist() == ref_assign.tolist()
        np.testing.assert_allclose(merged[b].numpy(), ref_merged, rtol=1e-9, atol=1e-12)


def test_merge_mean_and_bad_cluster_count():
    x = torch.arange(12, dtype=torch.float32).reshape(1, 4, 3)
    out = merge_by_mean(x, torch.tensor([[0, 1, 0, 1]]), 2)
    assert torch.equal(out[0, 0], (x[0, 0] + x[0, 2]) / 2)
    with pytest.raises(AiflowError, match="n_clusters"):
        dpc_knn_merge(x, 5)


# ---- entropy model ------------------------------------------------------------------------------

def test_laplace_bits_are_the_discretized_laplacian():
    scale = torch.tensor(0.7, dtype=torch.float64)
    cdf = lambda t: 0.5 + 0.5 * math.copysign(1, t) * (1 - math.exp(-abs(t) / 0.7))  # noqa: E731
    for s in (-3, -1, 0, 1, 2, 6):
        expected = -math.log2(cdf(s + 0.5) - cdf(s - 0.5))
        assert float(laplace_bits(torch.tensor(float(s), dtype=torch.float64), scale)) == pytest.approx(expected, rel=1e-9)
    # The probabilities of all integers sum to one.
    total = sum(2 ** -float(laplace_bits(torch.tensor(float(s), dtype=torch.float64), scale)) for s in range(-15, 16))
    assert total == pytest.approx(1.0, abs=1e-7)


def test_balance_loss_formula():
    w = torch.tensor([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    usage = torch.tensor([0.6, 0.25, 0.15])
    assert float(balance_loss(w)) == pytest.approx(float(((usage - 1 / 3) ** 2).sum()))


def small_codec(seed: int = 0, experts: int = 3) -> TofcCodec:
    torch.manual_seed(seed)
    codec = TofcCodec(CodecConfig(channels=16, latent=8, hyper=2, experts=experts, hidden=32))
    with torch.no_grad():  # spread y so symbols are not all zero
        codec.analysis[2].weight.mul_(8)
    return codec.eval()


def test_training_forward_has_gradients_and_positive_rate():
    codec = small_codec().train()
    x = torch.randn(4, 6, 16)
    out = codec(x)
    assert out.reconstruction.shape == x.shape and out.bits.shape == (4,)
    assert torch.all(out.bits > 0)
    (out.bits.mean() + out.reconstruction.square().mean() + out.balance).backward()
    assert codec.router.weight.grad is not None and codec.experts[0].z_log_scale.grad is not None


def test_coding_tables_match_the_per_token_definition():
    """The batched tables (tokens grouped by expert) equal each token's own expert applied alone."""
    from aiflow_fl.tofc.entropy import quantize_mean, quantize_scale

    codec = small_codec()
    x = torch.randn(40, 16) * 2
    choice, z_hat, _ = codec.to_symbols(x)
    assert len(torch.unique(choice)) > 1  # the grouping is exercised
    z_scales, means, scales = codec.coding_params(z_hat, choice)
    synthesis64 = [copy.deepcopy(e.hyper_synthesis).double() for e in codec.experts]
    with torch.no_grad():
        for i, e in enumerate(choice.tolist()):
            mean, raw = synthesis64[e](z_hat[i].double()).chunk(2)
            assert torch.equal(means[i], quantize_mean(mean))
            assert torch.equal(scales[i], quantize_scale(torch.nn.functional.softplus(raw)))
            assert torch.equal(z_scales[i], quantize_scale(codec.experts[e].z_log_scale.double().exp()))
            expected_z = torch.round(codec.experts[e].hyper_analysis(codec.analysis(x[i]))).long()
            assert torch.equal(z_hat[i], expected_z.clamp(-1023, 1023))


# ---- bitstreams ---------------------------------------------------------------------------------

def test_round_trip_is_exact_and_rate_matches_estimate():
    codec = small_codec()
    x = torch.randn(40, 16) * 2
    encoded = encode_tokens(codec, x)
    decoded = decode_symbols(codec, encoded.data)
    for mine, other in zip(codec.to_symbols(x), decoded):
        assert torch.equal(mine, other)  # the decoder recovers the encoder's integers exactly
    assert torch.equal(decode_tokens(codec, encoded.data), codec.from_symbols(*decoded))
    payload_bits = 8 * (encoded.num_bytes - 6)  # header: magic, fingerprint, n_c, 2-byte varint
    assert encoded.estimated_bits > 500
    assert abs(payload_bits - encoded.estimated_bits) / encoded.estimated_bits < 0.05


def test_round_trip_across_processes(tmp_path):
    codec = small_codec(seed=3)
    torch.save(codec.state_dict(), tmp_path / "codec.pt")
    x = torch.randn(10, 16)
    data = encode_tokens(codec, x).data
    (tmp_path / "stream.bin").write_bytes(data)
    script = (
        "import sys, torch\n"
        "from aiflow_fl.tofc.entropy import CodecConfig, TofcCodec\n"
        "from aiflow_fl.tofc.bitstream import decode_symbols\n"
        "codec = TofcCodec(CodecConfig(channels=16, latent=8, hyper=2, experts=3, hidden=32)).eval()\n"
        f"codec.load_state_dict(torch.load(r'{tmp_path / 'codec.pt'}'))\n"
        f"out = decode_symbols(codec, open(r'{tmp_path / 'stream.bin'}', 'rb').read())\n"
        f"torch.save(out, r'{tmp_path / 'out.pt'}')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=str(tmp_path.parent), env=_env())
    # The other process recovers the encoder's integers exactly (router choices, ẑ, y symbols).
    theirs = torch.load(tmp_path / "out.pt")
    for mine, other in zip(codec.to_symbols(x), theirs):
        assert torch.equal(mine, other)


def _env():
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
    return env


def test_bad_bitstreams_are_refused():
    codec = small_codec()
    data = encode_tokens(codec, torch.randn(5, 16)).data
    with pytest.raises(AiflowError, match="empty"):
        decode_tokens(codec, b"")
    with pytest.raises(AiflowError, match="truncated"):
        decode_tokens(codec, data[:-3])
    with pytest.raises(AiflowError, match="truncated"):
        decode_tokens(codec, data[:3])
    with pytest.raises(AiflowError, match="longer"):
        decode_tokens(codec, data + b"\0")
    with pytest.raises(AiflowError, match="another codec"):
        decode_tokens(small_codec(seed=9), data)
    with pytest.raises(AiflowError, match="Not a TOFC"):
        decode_tokens(codec, b"\x89PNG\r\n\x1a\n" + bytes(20))
    with pytest.raises(AiflowError, match="float16"):
        decode_tokens(codec, encode_fp16(torch.randn(3, 16)))
    with pytest.raises(AiflowError, match="shape"):
        encode_tokens(codec, torch.randn(5, 15))


def test_fp16_stream_round_trip():
    x = torch.randn(7, 16)
    data = encode_fp16(x)
    assert len(data) == 5 + 7 * 16 * 2
    assert torch.equal(decode_fp16(data, 16), x.half().float())
