"""The official `openai` Python SDK, unchanged, against a running tokenscope.

    python3 tests/clients/openai_sdk.py http://127.0.0.1:PORT [API_KEY]

Checks completions with echo log-probs, chat with top_logprobs, streaming of both and
models.list(), and that the numbers equal tokenscope's own /generate (prompt_logprobs) for the
same tokens. Exits non-zero on the first failed check. Run by scripts/clients.sh.
"""

import json
import sys
import urllib.request

from openai import OpenAI

BASE = sys.argv[1].rstrip("/")
KEY = sys.argv[2] if len(sys.argv) > 2 else "none"
PROMPT = "The capital of France is"
client = OpenAI(base_url=f"{BASE}/v1", api_key=KEY, max_retries=0, timeout=120)
checks = 0


def check(cond, what):
    global checks
    if not cond:
        print(f"openai-sdk: FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    checks += 1


def native(path, body):
    req = urllib.request.Request(
        f"{BASE}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"},
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)


model = client.models.list().data[0].id
check(model, "models.list() names the model")

# Completions with echo: every prompt token scored, the first None, then the generated token.
c = client.completions.create(
    model=model, prompt=PROMPT, logprobs=5, echo=True, max_tokens=1, temperature=0
)
lp = c.choices[0].logprobs
check(c.choices[0].text == PROMPT + " Paris", f"echoed text: {c.choices[0].text!r}")
check(lp.token_logprobs[0] is None, "first echoed token has no log-prob")
check(len(lp.tokens) == c.usage.prompt_tokens + 1, "one entry per prompt token plus one")
for i in range(1, len(lp.tokens)):
    top = lp.top_logprobs[i]
    check(top[lp.tokens[i]] == lp.token_logprobs[i], f"chosen token in top_logprobs at {i}")
    check(len(top) <= 6, f"at most logprobs + 1 alternatives at {i}")
g = native(
    "/generate",
    {"prompt": PROMPT, "prompt_logprobs": True, "top_k": 5, "temperature": 0},
)
for i, entry in enumerate(g["prompt"]):
    check(entry["logprob"] == lp.token_logprobs[i], f"/generate equals echo at {i}")
# The generated token: same as /generate's own first step (both the model's distribution).
check(g["steps"][0]["token"] == lp.tokens[-1], "same next token as /generate")
check(abs(g["steps"][0]["logprob"] - lp.token_logprobs[-1]) < 1e-6, "same next log-prob")

# Chat with top_logprobs.
messages = [{"role": "user", "content": "What is the capital of France?"}]
r = client.chat.completions.create(
    model=model, messages=messages, logprobs=True, top_logprobs=5, max_tokens=6, temperature=0
)
content = r.choices[0].logprobs.content
check(len(content) == r.usage.completion_tokens, "one logprobs entry per generated token")
check(all(len(t.top_logprobs) == 5 for t in content), "five alternatives per token")
check("".join(bytes(t.bytes).decode("utf-8", "replace") for t in content).startswith(
    r.choices[0].message.content[:3]), "bytes spell the reply")
ids = native("/tokenize", {"messages": messages})["tokens"]
p = client.completions.create(model=model, prompt=ids, max_tokens=6, logprobs=5, temperature=0)
check(p.choices[0].text == r.choices[0].message.content, "chat equals completions on its template")
check([t.logprob for t in content] == p.choices[0].logprobs.token_logprobs, "same log-probs")

# Streaming, both kinds: the pieces add up to the non-streamed answer.
parts = []
for chunk in client.completions.create(
    model=model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=1, stream=True
):
    parts.append(chunk.choices[0].text)
whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0)
check("".join(parts) == whole.choices[0].text, "streamed completion equals the whole")
parts = []
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=6, temperature=0, stream=True,
    stream_options={"include_usage": True},
):
    if chunk.choices and chunk.choices[0].delta.content:
        parts.append(chunk.choices[0].delta.content)
check("".join(parts) == r.choices[0].message.content, "streamed chat equals the whole")

print(f"openai-sdk: {checks} checks passed (model {model})")
