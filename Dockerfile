# posttrain on NVIDIA GPUs: CUDA runtime, PyTorch with CUDA (pulled in by vLLM), vLLM for rollouts, DeepSpeed.
#   docker build -t posttrain .
#   docker run --gpus all --ipc=host -v $PWD/runs:/workspace/runs posttrain \
#       accelerate launch --config_file launch/ddp.yaml -m posttrain train recipes/gsm8k/qwen2.5-0.5b-sft.yaml
FROM nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1

RUN apt-get update && apt-get install -y --no-install-recommends \
        python3.11 python3.11-venv python3.11-dev build-essential git ninja-build \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

WORKDIR /workspace
# vLLM first: it pins the CUDA build of torch it was compiled against; everything else adapts to that torch.
# Every pin is the version the tests run with (tests/test_packaging.py checks it; vLLM's is .ci/vllm-env.sh's).
RUN pip install vllm==0.32.0
COPY pyproject.toml README.md ./
COPY posttrain ./posttrain
COPY rewards ./rewards
RUN pip install \
        transformers==5.24.0 trl==1.16.0 peft==0.21.2 accelerate==1.15.0 deepspeed==0.19.8 datasets==5.2.0 \
        tokenizers==0.23.3 math-verify==0.9.0 tensorboard==2.21.0 pyyaml==6.0.4 tqdm==4.70.1 safetensors==0.8.0 \
        matplotlib==3.11.2 \
    && pip install --no-deps -e .
COPY recipes ./recipes
COPY launch ./launch

CMD ["posttrain", "--help"]
