"""Server memory over 1,000 requests, a third cancelled: RSS of the server process after a
48-request warm-up and after each further 200 (8 concurrent clients, 8-token chat answers; every
third request is streamed and dropped after its first chunk, so the server cancels it).

    fastdecode serve --port 8712 --dtype int4 --max-batch 8 --threads 2 --log-level warning &
    python scripts/server_memory.py http://127.0.0.1:8712 $(pgrep -f "serve --port 8712")
"""
import json
import sys
import threading
import time

import httpx

URL = sys.argv[1]
pid = int(sys.argv[2])
def rss():
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"):
            return int(line.split()[1]) / 1024
prompts = ["Tell me a fact about the sea.", "What is 2+2?", "Name a color.", "Write one word.", "Say hello in French."]
done = [0]; cancelled = [0]; errors = []
lock = threading.Lock()
def worker(k, n):
    with httpx.Client(base_url=URL, timeout=120) as c:
        for i in range(n):
            j = k * n + i
            body = {"model": model, "messages": [{"role": "user", "content": prompts[j % 5] + f" ({j})"}], "max_tokens": 8, "temperature": 0}
            try:
                if j % 3 == 0:  # streamed and dropped after the first chunk: the server cancels it
                    with c.stream("POST", "/v1/chat/completions", json=body | {"stream": True}) as r:
                        for _ in r.iter_lines():
                            break
                    with lock: cancelled[0] += 1
                else:
                    r = c.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
            except Exception as e:
                with lock: errors.append(repr(e))
            with lock: done[0] += 1
def phase(total):
    ths = [threading.Thread(target=worker, args=(k, total // 8)) for k in range(8)]
    [t.start() for t in ths]; [t.join() for t in ths]
model = httpx.get(URL + "/v1/models").json()["data"][0]["id"]
phase(48)
r0 = rss(); t0 = time.time()
marks = []
for step in range(5):
    phase(200)
    marks.append(round(rss(), 1))
print(json.dumps({"rss_after_warmup_mb": round(r0, 1), "rss_after_each_200_mb": marks, "requests": done[0], "cancelled": cancelled[0], "errors": len(errors), "first_errors": errors[:2], "seconds": round(time.time() - t0)}))
