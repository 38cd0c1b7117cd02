"""gRPC metadata keys that are part of Cloudach's internal contracts."""

#: Sent by inference_svc as initial metadata once a Generate request is validated, before any
#: token: the prompt's size in tokens. A request refused fails without it.
PROMPT_TOKENS = "x-prompt-tokens"
