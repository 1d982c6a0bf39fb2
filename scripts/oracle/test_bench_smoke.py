"""`espd bench` in smoke mode: every algorithm makes the in-memory round trip
(encapsulate → decapsulate through the engine) with no failure, and the
report has its fields. Speed itself is measured, not asserted (docs/performance.md)."""

import json
import subprocess

import pytest

from espd_oracle import ESPD


@pytest.mark.parametrize("aead", ["gcm128", "gcm256", "chacha", "gmac128", "cbc128", "cbc256", "null"])
def test_bench_round_trips_every_algorithm(aead):
    r = subprocess.run([str(ESPD), "bench", "--seconds", "0.2", "--workers", "1", "--size", "imix",
                        "--aead", aead, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["failed"] == 0 and d["packets"] > 100
    assert d["pps"] > 0 and d["gbps"] > 0 and d["raw_aead"]["pps"] > 0 and d["ratio"] > 0
    lat = d["latency_ns"]
    assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"] <= lat["p999"] <= lat["max"]


def test_bench_report_and_bad_arguments():
    r = subprocess.run([str(ESPD), "bench", "--seconds", "0.2", "--size", "512"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Mpps" in r.stdout and "ratio" in r.stdout
    for bad in (["--aead", "rot13"], ["--size", "12"], ["--size", "big"]):
        r = subprocess.run([str(ESPD), "bench", "--seconds", "0.1", *bad], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "espd:" in r.stderr


@pytest.mark.parametrize("burst", ["1", "7", "1024"])
def test_bench_bursts_of_any_size_round_trip(burst):
    r = subprocess.run([str(ESPD), "bench", "--seconds", "0.2", "--workers", "1", "--size", "imix",
                        "--burst", burst, "--json"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["burst"] == int(burst) and d["failed"] == 0 and d["packets"] > 100
    for bad in ("0", "1025", "x"):
        r = subprocess.run([str(ESPD), "bench", "--seconds", "0.1", "--burst", bad], capture_output=True, text=True, timeout=30)
        assert r.returncode != 0 and "--burst" in r.stderr


def test_bench_round_trips_while_changes_stream_in():
    """--tunnels/--changes-per-second: the worker takes every published change
    between bursts and no packet fails the round trip (docs/performance.md)."""
    r = subprocess.run([str(ESPD), "bench", "--seconds", "0.3", "--workers", "1", "--size", "512",
                        "--tunnels", "2000", "--changes-per-second", "500", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["failed"] == 0 and d["packets"] > 100
    assert d["changes"] > 50 and 0 < d["table_switches"] <= d["changes"], d
    s = d["switch_ns"]
    assert 0 < s["p50"] <= s["p99"] <= s["max"], s
