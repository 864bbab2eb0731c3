"""`recfuse serve-llm` through the official `openai` Python client, as a user would call it.

Run by scripts/check-openai-client.sh (which installs the pinned client and starts the server
with a bearer key): non-streamed and streamed completions with usage (and cached prompt tokens
when a prompt repeats), `stop` (both ways), text
content parts, and the errors the client raises (unknown model, response_format, bad role,
wrong key). Exits non-zero with the failed check on the first failure.

Usage: openai_client_check.py BASE_URL API_KEY
"""
import sys

import openai
from openai import OpenAI

base_url, key = sys.argv[1], sys.argv[2]
client = OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)
model = client.models.list().data[0].id
ask = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]


def check(what, ok):
    print(f"{'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        sys.exit(1)


# Non-streamed, with usage.
r = client.chat.completions.create(model=model, messages=ask, max_tokens=60, temperature=0)
free = r.choices[0].message.content
check(f"non-streamed answer ({free[:40]!r}...)", bool(free) and r.choices[0].finish_reason in ("stop", "length"))
check("usage counts tokens", r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
      and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens)

# Streamed, with the usage chunk.
text, usage = "", None
for chunk in client.chat.completions.create(model=model, messages=ask, max_tokens=60, temperature=0,
                                             stream=True, stream_options={"include_usage": True}):
    if chunk.choices and chunk.choices[0].delta.content:
        text += chunk.choices[0].delta.content
    if chunk.usage:
        usage = chunk.usage
check("streamed answer equals the non-streamed one (greedy)", text == free)
check("streamed usage chunk", usage is not None and usage.completion_tokens == r.usage.completion_tokens)
# The same prompt again: all of it but the last token comes from the prefix cache.
check("usage.prompt_tokens_details.cached_tokens on a repeated prompt",
      usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1)

# stop: the answer ends before the stop text, streamed or not, and never shows part of it.
at = free.find("5")
stop = free[at - 1:at + 1]
cut = client.chat.completions.create(model=model, messages=ask, max_tokens=60, temperature=0, stop=[stop])
check(f"stop {stop!r}: cut before it", cut.choices[0].message.content == free[:free.find(stop)]
      and cut.choices[0].finish_reason == "stop")
streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
    model=model, messages=ask, max_tokens=60, temperature=0, stop=stop, stream=True) if c.choices)
check("stop while streaming: same text, no part of the stop", streamed == free[:free.find(stop)])

# Content as text parts.
parts = client.chat.completions.create(model=model, max_tokens=4, temperature=0, messages=[
    {"role": "user", "content": [{"type": "text", "text": "Name a colour."}, {"type": "text", "text": "One word."}]}])
check("text content parts accepted", parts.choices[0].message.content is not None)


def raises(what, error, status, param, call):
    try:
        call()
    except error as e:
        body = e.body if isinstance(e.body, dict) else {}
        check(f"{what}: {type(e).__name__} {e.status_code}, param {body.get('param')!r}",
              e.status_code == status and body.get("param") == param)
        return
    check(f"{what}: no error raised", False)


raises("unknown model", openai.NotFoundError, 404, "model",
       lambda: client.chat.completions.create(model="gpt-4o", messages=ask, max_tokens=4))
raises("response_format json_object", openai.BadRequestError, 400, "response_format",
       lambda: client.chat.completions.create(model=model, messages=ask, max_tokens=4, response_format={"type": "json_object"}))
raises("unknown role", openai.BadRequestError, 400, "messages[0].role",
       lambda: client.chat.completions.create(model=model, messages=[{"role": "wizard", "content": "hi"}], max_tokens=4))
raises("max_tokens 0", openai.BadRequestError, 400, "max_tokens",
       lambda: client.chat.completions.create(model=model, messages=ask, max_tokens=0))
wrong = OpenAI(base_url=base_url, api_key="wrong-key", max_retries=0)
raises("wrong API key", openai.AuthenticationError, 401, None,
       lambda: wrong.chat.completions.create(model=model, messages=ask, max_tokens=4))
print("the official openai client passed every check")
