"""The project's own SGLang-protocol server: a real HTTP server over a Hugging Face
transformers model, the embedded default rollout engine (no extra install, starts in
seconds, CPU or GPU).

    python -m megatron_hpt.rollout.server --model-path DIR --port P [--device auto]

It answers the SGLang 0.5.23 routes the client uses (``routes.ROUTES`` lists them;
``protocol.py`` the shapes). Requests are validated at the edge with SGLang's status
codes and error bodies, and unlike real SGLang an out-of-vocabulary id is refused (400)
instead of crashing the server. Features SGLang has and this server does not (stop
strings, penalties, grammars, streaming, top log-probs, ...) are refused with a 400
naming them, never silently ignored.

Modules, by concern:
- ``validation``: /generate bodies checked and turned into rows, size limits;
- ``scheduler``: the generation worker, batching, aborts, deadlines, the watchdog, and
  the gate between generation and weight swaps;
- ``routes``: the HTTP routes for generation, health, information and control, with
  authentication and error shaping; ``replies``: reply bodies;
- ``weights`` and ``weight_routes``: weight updates (disk, distributed) and memory
  release, received whole or not at all;
- ``state``: the options and what one server holds; ``cli``: the command line and
  process lifetime; ``threads``: blocking work that never holds up shutdown.
"""
