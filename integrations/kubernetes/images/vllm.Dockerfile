# vLLM with the kvtier connector (Deployment vllm).  Build from the repository root:
#   docker build -f integrations/kubernetes/images/vllm.Dockerfile \
#     --build-arg VLLM_IMAGE=vllm/vllm-openai:v0.11.0 -t REGISTRY/kvtier-vllm:0.1.0 .
# The connector needs vLLM 0.11 or newer; the image keeps vLLM's own torch.
ARG VLLM_IMAGE=vllm/vllm-openai:v0.11.0
FROM ${VLLM_IMAGE}
COPY . /tmp/kvtier
RUN pip install --no-cache-dir "/tmp/kvtier[disk,remote,redis,metrics]" && rm -rf /tmp/kvtier
ENTRYPOINT []
