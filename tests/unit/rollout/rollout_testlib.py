"""Helpers of the rollout tests: raw HTTP calls, HF references, weight edits, and the
check of requests and replies against SGLang's JSON contract."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import torch

from megatron_hpt.rollout import RolloutConfig


class ContractChecker:
    """Decodes requests and replies with SGLang's contract and records what fails."""

    def __init__(self, api):
        self.api = api
        self.requests_seen = 0
        self.errors: list[str] = []

    def observe_request(self, url: str, path: str, body) -> None:
        if path == "/generate":
            self.requests_seen += 1
            try:
                self.api.GenerateRequest.from_json_value(body)
            except self.api.JsonContractError as e:
                self.errors.append(f"request to {url}: {e}: {str(body)[:200]}")

    def check_reply(self, reply) -> None:
        """Every item decodes, and our meta_info keys are all fields of the contract."""
        known = set(self.api.GenerateMetaInfo.__struct_fields__)
        top = set(self.api.GenerateResponse.__struct_fields__)
        for item in reply if isinstance(reply, list) else [reply]:
            self.api.GenerateResponse.from_json_value(item)
            assert set(item) <= top, f"reply fields outside SGLang's contract: {set(item) - top}"
            extra = set(item["meta_info"]) - known
            assert not extra, f"meta_info fields outside SGLang's contract: {extra}"


def post(url: str, path: str, body, timeout: float = 120.0, headers: dict | None = None, method: str = "POST") -> tuple[int, object]:
    """(status, decoded JSON or text) of a raw POST: tests send bad requests on purpose."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"content-type": "application/json", **(headers or {})}, method=method)
    return _send(req, timeout)


def get(url: str, path: str, timeout: float = 60.0, headers: dict | None = None) -> tuple[int, object]:
    return _send(urllib.request.Request(url + path, headers=headers or {}), timeout)


def _send(req: urllib.request.Request, timeout: float) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, raw = r.status, r.read()
    except urllib.error.HTTPError as e:
        status, raw = e.code, e.read()
    try:
        return status, json.loads(raw) if raw else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        return status, raw.decode(errors="replace")


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos: int | None = None) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def recompute_logprobs(model, prompt: list[int], output_ids: list[int], temperature: float) -> torch.Tensor:
    """The trainer's view: one plain forward over prompt + response, log_softmax(logits / T)."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + output_ids])).logits[0].float()
    t = temperature if temperature > 0 else 1.0
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1] / t, dim=-1)
    return logp.gather(-1, torch.tensor(output_ids)[:, None]).squeeze(1)


def perturbed_weights(model, scale: float = 3.0, seed: int = 1) -> dict[str, torch.Tensor]:
    """A copy of the model's weights with lm_head and the last MLP changed enough to move outputs."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.state_dict().items():
        t = p.detach().clone()
        if name == "lm_head.weight" or "layers.3.mlp" in name:
            t += scale * 0.02 * torch.randn(t.shape, generator=g)
        out[name] = t
    return out


def hf_reference_model(model_dir):
    """The HF model that servers' outputs are checked against (fp32, one thread)."""
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def model_with(model_dir, weights: dict[str, torch.Tensor]):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    m.load_state_dict(weights)
    return m


def own_engine_config(**changes) -> RolloutConfig:
    base = dict(engine="own", num_servers=1, server_threads=1, startup_timeout_s=120, request_timeout_s=120, max_new_tokens=32)
    base.update(changes)
    return RolloutConfig(**base)
