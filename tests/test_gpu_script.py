"""The pieces of benchmarks/gpu.sh a GPU session relies on and cannot debug in its minutes: the
variant rows bench.py is given, the MaxText log side_by_side.py reads, and the script's usage
(its stages are dry-run on CPU by hand: DRY=1, see the script)."""

import json
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench  # noqa: E402
import side_by_side  # noqa: E402

# As MaxText 0.2.5 logs a step (metric_logger.py), with the logging prefix.
_LINE = (
  "I1205 14:19:02.1 1400 metric_logger.py:265] completed step: {step}, seconds: {s}, TFLOP/s/device: {t}, "
  "Tokens/s/device: {k}, total_weights: 256, loss: 8.157, lm_loss: 6.284, mtp_loss: 1.872"
)


def test_a_variant_splits_into_config_overrides_and_jax_options():
  name, overrides, options = bench.parse_variant(
    "bf16:model.moe.mode=dropless,jax_default_matmul_precision=bfloat16,model.x=a=b"
  )
  assert name == "bf16" and overrides == ["model.moe.mode=dropless", "model.x=a=b"]
  assert options == {"jax_default_matmul_precision": "bfloat16"}
  for bad, why in [
    ("noname", "expected NAME"),
    (":a=1", "expected NAME"),
    ("x:a", "expected NAME"),
    ("x:jax_nope=1", "no option"),
  ]:
    with pytest.raises(ValueError, match=why):
      bench.parse_variant(bad)


def test_a_jax_option_holds_for_its_row_only():
  import jax

  before = jax.config.jax_debug_nans
  with bench.jax_options({"jax_debug_nans": "true"}):
    assert jax.config.jax_debug_nans is True
  assert jax.config.jax_debug_nans == before


def test_maxtext_runs_are_the_median_of_their_steps_after_the_first_two(tmp_path):
  steps = [
    (0, 9.0, 0.1, 50.0),
    (1, 0.9, 1.0, 900.0),
    (2, 0.5, 2.0, 2000.0),
    (3, 0.4, 2.5, 2500.0),
    (4, 0.6, 1.5, 1500.0),
  ]
  log = tmp_path / "maxtext-1.txt"
  log.write_text("\n".join(["starting", *(_LINE.format(step=a, s=b, t=c, k=d) for a, b, c, d in steps)]))
  run = side_by_side.maxtext_run(log)
  assert run == {"tokens_per_sec": 2000.0, "step_time": 0.5, "tflops_per_sec": 2.0, "steps": 3}
  (tmp_path / "maxtext-2.txt").write_text("Traceback ...\nRuntimeError: cuDNN is not detected.\n")
  with pytest.raises(ValueError, match=r"maxtext-2.txt: no timed MaxText step logged; .*cuDNN is not detected"):
    side_by_side.maxtext_run(tmp_path / "maxtext-2.txt")


def test_the_side_by_side_table_is_ours_over_maxtext_per_turn(tmp_path, capsys):
  for turn, ours in [(1, 3000.0), (2, 2600.0)]:
    row = {"tokens_per_sec": ours, "step_time": 1.0}
    (tmp_path / f"ours-{turn}.json").write_text(json.dumps({"rows": [row]}))
    lines = [_LINE.format(step=s, s=1.0, t=1.0, k=2000.0) for s in range(4)]
    (tmp_path / f"maxtext-{turn}.txt").write_text("\n".join(lines))
  assert side_by_side.main([str(tmp_path), "--settings", "attention=dot_product"]) == 0
  out = capsys.readouterr().out
  assert "| 1 | 3,000 |" in out and out.strip().endswith("turn 2 (both compiles read back from the cache): 1.300")
  assert [r["ratio"] for r in json.loads((tmp_path / "side_by_side.json").read_text())] == [1.5, 1.3]
  (tmp_path / "ours-2.json").unlink()
  assert side_by_side.main([str(tmp_path)]) == 1


def test_the_script_parses_and_names_its_stages():
  subprocess.run(["bash", "-n", str(ROOT / "benchmarks" / "gpu.sh")], check=True)
  out = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "nope"], capture_output=True, text=True)
  assert out.returncode == 2 and "wheels | dry-venv DIR | train | maxtext | speculative" in out.stderr


def test_a_row_that_fails_is_reported_and_the_others_still_run(tmp_path, capsys):
  """On a GPU a kernel may refuse the shapes or run out of memory; here mosaic_gpu on the CPU."""
  from conftest import TINY

  out = tmp_path / "rows.json"
  argv = ["--config", "configs/tiny.yaml", *TINY, "--depths", "0", "--steps", "1", "--warmup", "1"]
  argv += [
    "--vary",
    "mosaic:model.moe.mode=dropless,model.moe.kernel=mosaic_gpu",
    "--vary",
    "dropless:model.moe.mode=dropless",
  ]
  assert bench.main([*argv, "--json", str(out)]) == 1
  printed = capsys.readouterr().out
  assert (
    "| mosaic | 0 | all | failed: ConfigError: config error: model.moe.kernel=mosaic_gpu: is a GPU kernel" in printed
  )
  rows = json.loads(out.read_text())["rows"]
  assert [r["variant"] for r in rows] == ["as given", "mosaic", "dropless"]
  assert "error" in rows[1] and rows[0]["tokens_per_sec"] > 0 and rows[2]["tokens_per_sec"] > 0
