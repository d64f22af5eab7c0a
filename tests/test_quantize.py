"""The wire codecs: int8 size, round-trip error bound and error feedback; one codec per run,
refusing payloads in another encoding; int8 refused with backend gloo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from smolcluster import codec, quantize
from smolcluster.config import PACKAGED_CONFIGS, ConfigError, load_settings
from smolcluster.harness import LocalCluster
from smolcluster.protocol import FLAG_INT8, Frame, MsgType, ProtocolError
from smolcluster.replica import Replica
from smolcluster.report import load_run


def test_round_trip_error_is_within_half_a_step_per_block() -> None:
    torch.manual_seed(0)
    values = torch.randn(339_210) * torch.logspace(-4, 1, 339_210)  # scales vary a lot
    decoded = quantize.decode(quantize.encode(values), values.numel())
    blocks = quantize._blocks(values.numel())
    padded = torch.nn.functional.pad(values, (0, blocks * quantize.BLOCK - values.numel()))
    step = padded.view(blocks, -1).abs().amax(dim=1) / 127
    bound = step.repeat_interleave(quantize.BLOCK)[: values.numel()] / 2
    assert ((decoded - values).abs() <= bound * (1 + 1e-5) + 1e-12).all()


def test_encoded_size_is_about_a_quarter() -> None:
    n = 339_210
    assert quantize.encode(torch.randn(n)).numel() == quantize.encoded_nbytes(n)
    assert quantize.encoded_nbytes(n) / (4 * n) <= 0.26


def test_zeros_and_odd_lengths() -> None:
    for n in (1, 1023, 1025, 5000):
        values = torch.zeros(n)
        values[n // 2] = 3.0
        decoded = quantize.decode(quantize.encode(values), n)
        assert decoded.shape == (n,)
        assert decoded[n // 2] == 3.0
        assert decoded.abs().sum() == 3.0


def test_error_feedback_carries_what_was_dropped() -> None:
    torch.manual_seed(1)
    feedback = codec.ErrorFeedback(codec.INT8, 4096)
    values = torch.randn(4096) * 1e-3
    values[0] = 10.0  # dwarfs the rest of its block: alone, they would round to zero
    sent_total = torch.zeros(4096)
    for _ in range(200):
        _, sent = feedback.encode(values)
        sent_total += sent
    # Over many messages the sum of what was sent tracks the sum of what was meant.
    assert (sent_total - 200 * values).abs().max() < 10.0 / 127


def _frame(payload: torch.Tensor, flags: int) -> Frame:
    return Frame(MsgType.GRADS, flags, {}, memoryview(payload.numpy()).cast("B"))


def test_the_run_picks_one_codec() -> None:
    assert codec.for_config(False) is codec.FP32 and codec.for_config(True) is codec.INT8
    assert (codec.FP32.flags, codec.INT8.flags) == (0, FLAG_INT8)
    assert codec.FP32.nbytes(1000) == 4000
    assert codec.INT8.nbytes(1000) == quantize.encoded_nbytes(1000)


def test_fp32_is_exact_and_reads_without_a_copy() -> None:
    values = torch.randn(3000)
    payload = codec.FP32.round_trip(values.clone())
    view = codec.FP32.read(_frame(payload, 0), 3000)
    assert torch.equal(view, values)
    view[0] = 42.0  # a view of the payload, not a copy
    assert payload[0] == 42.0


def test_int8_round_trip_leaves_the_sender_with_what_receivers_decode() -> None:
    torch.manual_seed(2)
    values = torch.randn(5000)
    sent = values.clone()
    payload = codec.INT8.round_trip(sent)
    assert not torch.equal(sent, values)  # lossy: the sender now holds the decoded numbers
    received = codec.INT8.read(_frame(payload, FLAG_INT8), 5000, out=torch.empty(5000))
    assert torch.equal(received, sent)


def test_a_payload_in_another_encoding_or_size_is_refused() -> None:
    fp32 = codec.FP32.encode(torch.ones(2048))
    int8 = codec.INT8.encode(torch.ones(2048))
    with pytest.raises(ProtocolError, match="GRADS payload with flags 1, this run sends fp32"):
        codec.FP32.read(_frame(int8, FLAG_INT8), 2048)
    with pytest.raises(ProtocolError, match="with flags 0, this run sends int8"):
        codec.INT8.read(_frame(fp32, 0), 2048)
    with pytest.raises(ProtocolError, match="GRADS payload of 8192 bytes, expected 4096"):
        codec.FP32.read(_frame(fp32, 0), 1024)


def test_int8_with_backend_gloo_is_refused_naming_both_keys(tmp_path: Path) -> None:
    cluster = yaml.safe_load((PACKAGED_CONFIGS / "cluster_config.yaml").read_text())
    cluster_file, nn_file = tmp_path / "cluster.yaml", tmp_path / "nn.yaml"
    cluster_file.write_text(yaml.safe_dump({**cluster, "backend": "gloo"}))
    nn_file.write_text((PACKAGED_CONFIGS / "nn_config.yaml").read_text())
    assert load_settings(cluster_file, nn_file).cluster.backend == "gloo"  # fp32 is fine
    with pytest.raises(ConfigError) as error:
        load_settings(cluster_file, nn_file, {"use_quantization": True})
    assert error.value.key == "use_quantization" and "backend gloo" in error.value.message
    cluster_file.write_text(
        yaml.safe_dump({**cluster, "backend": "gloo", "use_quantization": True})
    )
    files = ["--cluster-config", str(cluster_file), "--nn-config", str(nn_file)]
    command = [sys.executable, "-m", "smolcluster", "check-config", *files]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"smolcluster: error: {cluster_file}: use_quantization: "
        "true needs backend socket, not backend gloo"
    ]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "elastic"])
def test_int8_runs_end_to_end(mode: str, tmp_path: Path, offline_digits_root: Path) -> None:
    """Both modes with int8 on the wire, both directions: the run learns, sync's replicas stay
    bit-identical, and what the server sent is far below fp32's size."""
    cluster = LocalCluster(
        tmp_path,
        offline_digits_root,
        workers=2,
        cluster={
            "mode": mode,
            "use_quantization": True,
            "worker_update_interval": 5,
            "checksum_interval": 5,  # sync: replicas compared every 5 steps
            # Elastic starts with the first worker by default; a worker slow to import torch on a
            # loaded machine could then arrive after these 40 steps and find no server.
            "min_workers": 2,
        },
        nn={"max_steps": 40, "eval_steps": 40},
    )
    cluster.start()
    assert set(cluster.wait().values()) == {0}, cluster.logs()
    summary = cluster.summary()
    assert summary["samples"] >= 40 * 2 * 32
    assert summary["final_accuracy"] > 0.5, summary
    assert summary["checksum_mismatches"] == 0
    start = cluster.events("mini1", "start")[0]
    assert start["quantization"] is True
    numel = Replica.build(load_settings(cluster.cluster_file, cluster.nn_file).nn.model, 1, 0).numel
    # Sync: GRADS and AVERAGE per worker and step; elastic: every PUSH is answered with weights
    # (K = worker_update_interval), so each direction carries a message per server step.
    fp32 = 4 * numel * (40 * 2 if mode == "sync" else summary["steps"])
    starts = 2 * 3 * 4 * numel  # START carries the exact fp32 state
    assert summary["bytes_recv"] < 0.5 * fp32, summary  # int8 is 0.25 of it, fp32 1.0
    assert summary["bytes_sent"] < 0.5 * fp32 + starts, summary
    # Each worker says where its time went, in both modes: the report's per-host split.
    runs = {run.host: run for run in load_run(cluster.metrics_dir)}
    for host in ("mini2", "mini3"):
        timed = [e for e in cluster.events(host, "step") if e.get("step_time_s") is not None]
        assert timed, f"{host} wrote no step timers"
        if mode == "elastic":  # one window per push: K local steps, send, wait for the reply
            assert all(e["compute_s"] + e["wait_s"] <= e["step_time_s"] + 1e-6 for e in timed)
        assert runs[host].compute_s > 0 and runs[host].wait_s > 0, runs[host]
