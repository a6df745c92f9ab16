#!/usr/bin/env bash
# Issue 22's GPU figures in three stages, each one device command inside 10 minutes, the three
# about 12 minutes together by estimate (none has run on a GPU yet; a session is lent 15 minutes,
# the machine's start included). Each stage prints a table last and writes its logs and JSON to
# $OUT (what the device tool brings back: 8 files at most, so no stage writes more), or to
# runs/gpu/ without it. The machine starts bare and is given back 30 s after a call, so each
# stage compiles and trains what it measures.
#
#   bash benchmarks/gpu.sh wheels       # here, once: what the GPU image lacks, .whl/ours and .whl/maxtext
#   bash benchmarks/gpu.sh dry-venv DIR # here: a venv like the GPU image for the dry runs (below)
#   bash benchmarks/gpu.sh train        # ~6 min: the Mosaic GPU experts against ragged_dot (a test, first);
#                                       #   configs/small.yaml: MTP depths 0, 1, 2; attention xla against
#                                       #   cuDNN; capacity against dropless blocks (auto on GPU) and
#                                       #   through JAX's Mosaic GPU grouped matmuls; matmul and copy
#                                       #   ceilings. Rows in that order; none starts after 400 s; a row
#                                       #   that fails is reported and the next one runs. Then dropless
#                                       #   through lax.ragged_dot, 3 steps, if the stage is under 420 s.
#                                       #   Each row compiled here for an H200 (mtp-compile --topology
#                                       #   h200, no GPU) in 35-60 s on 2 cores (RESULTS, 2026-12-07)
#   bash benchmarks/gpu.sh maxtext      # ~4 min: ours and MaxText 0.2.5 on small.yaml's shapes, A B A B,
#                                       #   each with its best dropless experts that run (ours: mosaic_gpu)
#   bash benchmarks/gpu.sh speculative  # ~2.5 min: a tiny drafter trained there; plain against
#                                       #   speculative at batch 1 and 8, and at --scale gpu (~2.8B)
#
# A GPU session: `status`; `bash benchmarks/gpu.sh wheels` here; then with the device tool, back to
# back so the machine stays warm, each call naming kind="nvidia-h200" (a call that names none starts
# an H100, and a later switch costs a second start): run(command="bash benchmarks/gpu.sh train",
# carry=[".whl/ours"], kind="nvidia-h200", timeout_s=540); `maxtext` with carry=[".whl"] (ours and
# MaxText's, 40 MB), timeout_s=420; `speculative` with carry=[".whl/ours"], timeout_s=300; give_back.
# Where no H200 is lent, an H100 (same 989 TFLOP/s bf16 data-sheet peak, 3.35 against 4.8 TB/s of
# HBM, 80 against 141 GB) runs all three: RESULTS says which card. What a stage wrote under $OUT
# comes back even when its time limit stops it.
# DRY=1 runs a stage here on the CPU at tiny shapes (the same code paths, the GPU-only options
# falling back), so a GPU session only measures. PYTHON (default python3) runs everything, as the
# image's python3 does there: for a faithful dry run, `dry-venv`'s Python 3.12 venv with jax 0.11.2
# and the image's other packages, the carried wheels installed over it as there. No XLA flags are set:
# one GPU has no collectives for the latency-hiding scheduler to overlap; XLA_FLAGS passes through.
# Not measured: `jax_ragged_dot_use_gpu_pallas_triton_lowering`, the issue's first choice for a
# GPU grouped matmul: it imports jax._src.lax.pallas_lowerings, which no released jax wheel holds
# (0.10.2 and 0.11.2 checked here; jax-ml/jax#40888), so every row with it fails, and jax 0.12
# has no such option. Its successor here is JAX's Pallas Mosaic GPU grouped matmuls for Hopper
# (model.moe.kernel=mosaic_gpu; the same kernel files in jax 0.11.2 and 0.12.1).
set -euo pipefail
cd "$(dirname "$0")/.."

# What the GPU image (Python 3.12, jax 0.11.2; ../.library/device/KINDS.md lists its packages)
# lacks of setup.cfg's install_requires, at the versions CI installs; keep pydantic and
# pydantic-core a matching pair.
OURS=(
  grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 tensorboardX==2.6.5
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
)
# What MaxText 0.2.5's pre-training script imports that the image lacks (read from its imports in
# a venv, 2026-12-05), less xprof (32 MB, imported by tokamax for its benchmarking only:
# benchmarks/maxtext_stubs stands in) and google-cloud-aiplatform (MaxText stubs it itself).
MAXTEXT=(
  maxtext==0.2.5 aqtp==0.9.0 cffi==2.1.1 cloud-accelerator-diagnostics==0.1.1 cryptography==50.0.2
  drjax==0.2.1 einshape==1.0 fastapi==0.165.0 fire==0.7.1 google-api-core==2.44.0 google-auth==2.63.0
  google-cloud-appengine-logging==1.11.0 google-cloud-audit-log==0.6.3 google-cloud-bigquery==3.47.0
  google-cloud-core==2.8.0 google-cloud-logging==3.17.0 google-cloud-mldiagnostics==1.0.10
  google-cloud-monitoring==2.32.0 google-cloud-resource-manager==1.19.0 google-cloud-storage==3.17.1
  google-cloud-storage-control==1.17.0 google-crc32c==1.9.0 google-genai==2.34.0 google-resumable-media==2.11.0
  googleapis-common-protos==1.76.0 grpc-google-iam-v1==0.14.6 grpcio-status==1.85.3 httpcore2==2.17.0
  httpx2==2.17.0 immutabledict==4.3.1 ml-collections==1.1.0 ml-goodput-measurement==0.2.3 omegaconf==2.4.0
  opentelemetry-api==1.45.3 pathwaysutils==0.1.13 proto-plus==1.29.0 qwix==0.1.8 sniffio==1.3.1
  starlette==1.10.0 termcolor==3.3.0 tokamax==0.0.17 truststore==0.10.5 uvicorn==0.55.0 zstandard==0.25.0
)

# small.yaml's shapes in MaxText's terms (as ../shared/maxtext/compile.sh matched them for TPU, at
# one GPU's batch: 8 sequences x 4 microbatches = small.yaml's 32 of 2048 tokens) and ours beside
# them: remat full in both, MTP depth 1, the loss in 4 vocabulary-sized chunks, dropless experts.
MT_SHAPE="model_name=deepseek3-test override_model_config=true per_device_batch_size=8
  gradient_accumulation_steps=4 max_target_length=2048 num_vocab_tiling=4 vocab_size=32768 base_emb_dim=1536
  base_num_decoder_layers=12 first_num_dense_layers=1 base_mlp_dim=6144 base_num_query_heads=16
  base_num_kv_heads=16 q_lora_rank=768 kv_lora_rank=512 qk_nope_head_dim=128 qk_rope_head_dim=64
  v_head_dim=128 rope_type=default num_experts=64 num_experts_per_tok=6 base_moe_mlp_dim=512 shared_experts=2
  routed_score_func=sigmoid routed_bias=true routed_scaling_factor=2.5 n_routing_groups=8 topk_routing_group=4
  dtype=bfloat16 weight_dtype=float32"
OUR_SIDE=(--config configs/small.yaml train.remat=full model.moe.mode=dropless)
# Our dropless experts, best first (a setting that fails on the first turn gives way to the next).
OUR_SETTINGS=("model.moe.kernel=mosaic_gpu" "model.moe.kernel=auto")
# Synthetic data unpacked in both (one document a row: ours is, MaxText packs unless told not to).
MT_COMMON="remat_policy=full mtp_num_layers=1 mtp_loss_scaling_factor=0.3 routed_bias_update_rate=0.001
  load_balance_loss_weight=0.0001 dataset_type=synthetic packing=false enable_checkpointing=false
  skip_jax_distributed_system=true"
# MaxText's GPU settings, best first: cuDNN attention through JAX, tokamax's grouped matmuls for
# the dropless experts; where a setting fails (a kernel that does not take these shapes), the
# next (dot_product attention; jax.lax.ragged_dot), on the first turn; the second turn repeats
# what ran.
MT_SETTINGS=(
  "attention=cudnn_flash_jax sparse_matmul=true megablox=false use_tokamax_gmm=true"
  "attention=dot_product sparse_matmul=true megablox=false use_tokamax_gmm=true"
  "attention=cudnn_flash_jax sparse_matmul=true megablox=false use_tokamax_gmm=false"
  "attention=dot_product sparse_matmul=true megablox=false use_tokamax_gmm=false"
)
STEPS=12
TINY_MLA=(
  model.d_model=64 model.num_layers=3 model.d_ff=128 model.attention.kind=mla model.attention.num_heads=4
  model.attention.q_lora_rank=32 model.attention.kv_lora_rank=16 model.attention.qk_nope_head_dim=16
  model.attention.qk_rope_head_dim=8 model.attention.v_head_dim=16 model.moe.num_experts=8 model.moe.top_k=2
  model.moe.expert_d_ff=32 model.moe.n_group=1 model.moe.topk_group=1 data.seq_len=64 train.batch_size=8
  train.grad_accum_steps=2 train.loss_chunk_len=32 model.vocab_size=320
)

# The GPU image's packages (../.library/device/KINDS.md) that either program imports, at jax 0.11.2
# as there; the other versions are pip's choice, not the image's.
IMAGE=(
  jax==0.11.2 jaxlib==0.11.2 absl-py aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs certifi
  charset-normalizer chex click cloudpickle colorama etils filelock flatbuffers flax frozenlist fsspec grpcio h11
  httpcore httpx huggingface-hub humanize idna jaxtyping jinja2 markupsafe ml-dtypes mpmath msgpack multidict
  numpy optax opt-einsum orbax-checkpoint packaging prometheus-client propcache protobuf psutil pygments pyyaml
  pytest iniconfig pluggy
  regex requests rich safetensors scipy sentencepiece simplejson six sympy tensorboard tensorstore tiktoken
  tokenizers tqdm transformers treescope typing-extensions urllib3 uvloop wadler-lindig yarl zipp pyarrow pandas
)

usage() {
  echo "usage: [DRY=1] benchmarks/gpu.sh wheels | dry-venv DIR | train | maxtext | speculative" >&2
  exit 2
}

py=${PYTHON:-python3}

setup() {  # the carried wheels and this checkout on the path, no install step (no internet there)
  out=${OUT:-runs/gpu}
  mkdir -p "$out"
  export PYTHONPATH=$PWD/src:$PWD/benchmarks/maxtext_stubs${PYTHONPATH:+:$PYTHONPATH}
  local wheels
  wheels=$(compgen -G ".whl/*/*.whl" || true)  # .whl/ours, and .whl/maxtext where carried
  if [[ -n $wheels ]]; then
    rm -rf /tmp/site
    # shellcheck disable=SC2086  # one wheel a word
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  fi
  export PYTHONUNBUFFERED=1
  if [[ -n ${DRY:-} ]]; then
    export JAX_PLATFORMS=cpu
    shape=(--config configs/tiny.yaml "${TINY_MLA[@]}")
    mt_shape="model_name=deepseek3-test override_model_config=true per_device_batch_size=4
      gradient_accumulation_steps=2 max_target_length=64 num_vocab_tiling=2 vocab_size=320 base_emb_dim=64
      base_num_decoder_layers=3 first_num_dense_layers=1 base_mlp_dim=128 base_num_query_heads=4 base_num_kv_heads=4
      q_lora_rank=32 kv_lora_rank=16 qk_nope_head_dim=16 qk_rope_head_dim=8 v_head_dim=16 rope_type=default
      num_experts=8 num_experts_per_tok=2 base_moe_mlp_dim=32 shared_experts=1 routed_score_func=sigmoid
      routed_bias=true routed_scaling_factor=2.5 dtype=float32 weight_dtype=float32 hardware=cpu"
    our_side=("${shape[@]}" train.remat=full model.moe.mode=dropless)
    steps=3
  else
    shape=(--config configs/small.yaml)
    mt_shape="$MT_SHAPE hardware=gpu"
    our_side=("${OUR_SIDE[@]}")
    steps=$STEPS
  fi
  { nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    "$py" -c "import jax, platform; print('python', platform.python_version(), 'jax', jax.__version__, jax.devices())"
    echo "XLA_FLAGS=${XLA_FLAGS:-}"
  } 2>&1 | tee "$out/machine.txt"
}

maxtext_run() {  # one MaxText training run of $steps steps with settings $1, logged to $2
  local base
  base=$("$py" -c "import maxtext, os; print(os.path.join(os.path.dirname(maxtext.__file__), 'configs', 'base.yml'))")
  # shellcheck disable=SC2086  # the settings are words
  "$py" -m maxtext.trainers.pre_train.train "$base" run_name=side base_output_directory=/tmp/maxtext-out \
    steps="$steps" log_period=1 $1 $MT_COMMON $mt_shape >"$2" 2>&1
}

case ${1:-} in
  wheels)
    [[ $# -eq 1 ]] || usage
    rm -rf .whl
    for part in ours maxtext; do
      declare -n names=${part^^}
      "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d ".whl/$part" "${names[@]}"
    done
    du -sh .whl/*
    ;;
  dry-venv)
    [[ $# -eq 2 ]] || usage
    "$(pyenv prefix 3.12 2>/dev/null || pyenv prefix 3.12.1)/bin/python3.12" -m venv "$2"
    "$2/bin/python" -m pip install -q "${IMAGE[@]}"
    # What pip pulls in beyond the image's package list (KINDS.md's): gone, so that a missing wheel
    # shows in the dry run.
    kinds=${KINDS_MD:-../.library/device/KINDS.md}
    keep=$(sed -n 's/.*Packages: //p' "$kinds" | tr ',' '\n' | tr -d ' .' | tr 'A-Z_' 'a-z-')
    [[ -n $keep ]] || { echo "dry-venv: no package list in $kinds (set KINDS_MD)" >&2; exit 2; }
    extra=$("$2/bin/python" -m pip list --format=freeze | cut -d= -f1 | tr 'A-Z_.' 'a-z--' | grep -vxF "$keep" || true)
    echo "beyond the image's list, removed: $(echo $extra)"
    # shellcheck disable=SC2086  # one name a word
    [[ -z $extra ]] || "$2/bin/python" -m pip uninstall -q -y $extra
    echo "dry runs: PYTHON=$2/bin/python DRY=1 bash benchmarks/gpu.sh STAGE"
    ;;
  train)
    [[ $# -eq 1 ]] || usage
    setup
    # The Mosaic GPU experts against lax.ragged_dot, values and gradients, at small.yaml's widths
    # (on the CPU: in JAX's GPU interpret mode). A failure is reported; the rows still run.
    JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} "$py" -m pytest -q -o addopts= -p no:cacheprovider -rs \
      tests/test_moe_mosaic.py 2>&1 | tee "$out/mosaic-test.txt" || true
    "$py" benchmarks/gpu_ceiling.py 2>&1 | tee "$out/ceiling.txt"
    "$py" benchmarks/bench.py "${shape[@]}" --depths 0,1,2 --vary-depth 1 --steps "$steps" --warmup 2 \
      --json "$out/train.json" --stop-after 400 \
      --vary attention-xla:model.attention.impl=xla \
      --vary dropless:model.moe.mode=dropless \
      --vary dropless-mosaic:model.moe.mode=dropless,model.moe.kernel=mosaic_gpu \
      2>&1 | tee "$out/train.txt" || true  # a row that failed exits 1 after the table; the row below still runs
    # Dropless through lax.ragged_dot, which XLA:GPU runs as every row times every expert: 27x
    # the model's matmul FLOPs in small.yaml's step (mtp-compile --topology h200), so ~6 s a step:
    # 3 steps, where the stage has the time (its step time against the rows above: their depth 1).
    if ((SECONDS < 420)); then
      "$py" benchmarks/bench.py "${shape[@]}" model.moe.mode=dropless model.moe.kernel=ragged_dot --depths 1 \
        --steps 3 --warmup 1 --json "$out/ragged.json" 2>&1 | tee "$out/ragged.txt" || true
    else
      echo "dropless ragged_dot: not run, the stage had run ${SECONDS} s" | tee "$out/ragged.txt"
    fi
    ;;
  maxtext)
    [[ $# -eq 1 ]] || usage
    setup
    export JAX_COMPILATION_CACHE_DIR=/tmp/jax-cache  # the second run of each reads its compile back
    settings= ours=
    for turn in 1 2; do
      for try in "${OUR_SETTINGS[@]}"; do
        [[ -z $ours || $ours == "$try" ]] || continue
        if "$py" benchmarks/bench.py "${our_side[@]}" "$try" --depths 1 --steps "$steps" --warmup 2 \
          --json "$out/ours-$turn.json" 2>&1 | tee /tmp/ours.txt; then
          ours=$try
          break
        fi
        echo "ours: $try $(grep -o 'failed: .*' /tmp/ours.txt | head -n 1 | sed 's/ |$//')" | tee -a "$out/failed.txt"
        [[ -z $ours ]] || exit 1
      done
      [[ -n $ours ]] || { echo "ours: every setting failed" >&2; exit 1; }
      for try in "${MT_SETTINGS[@]}"; do
        [[ -z $settings || $settings == "$try" ]] || continue
        if maxtext_run "$try" "$out/maxtext-$turn.txt"; then
          settings=$try
          break
        fi
        why=$(grep -E '^[A-Za-z_.]*(Error|Exception)\b' "$out/maxtext-$turn.txt" | tail -n 1 | cut -c1-300)
        echo "maxtext: $try failed: $why" | tee -a "$out/failed.txt"
        [[ -z $settings ]] || exit 1
      done
      [[ -n $settings ]] || { echo "maxtext: every setting failed" >&2; exit 1; }
    done
    "$py" benchmarks/side_by_side.py "$out" --settings "$settings" --ours "$ours"  # its table, and side_by_side.json
    ;;
  speculative)
    [[ $# -eq 1 ]] || usage
    setup
    workdir=runs/spec-bench-gpu/sequential-d2  # not runs/spec-bench: the CPU runs stay
    rm -rf "$workdir"
    train_steps=${MTP_SPEC_STEPS:-$([[ -n ${DRY:-} ]] && echo 20 || echo 500)}
    "$py" -m mtp_jax.cli --config configs/tiny.yaml "train.steps=$train_steps" train.eval_every=0 \
      model.mtp.depth=2 "train.workdir=$workdir" "checkpoint.every=$train_steps" train.progress_bar=false 2>&1 |
      tail -n 3 | tee "$out/spec-train.txt"
    scale=$([[ -n ${DRY:-} ]] && echo "model.d_model=128 model.moe.expert_d_ff=64" || echo gpu)
    "$py" benchmarks/speculative.py "$workdir" --batches 1,8 --scale "$scale" --repeats 3 \
      --json "$out/speculative.json" 2>&1 | tee "$out/speculative.txt"
    ;;
  *) usage ;;
esac
