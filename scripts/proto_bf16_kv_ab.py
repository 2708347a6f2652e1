import sys, torch
from fastdecode import LLM, SamplingParams
from fastdecode.bench.data import load_prompts
from fastdecode.kv_cache import KVCache
limit = int(sys.argv[1]); temp = float(sys.argv[2]) if len(sys.argv) > 2 else 0.0
prompts, _ = load_prompts(limit=limit)
llm = LLM(threads=2, prefix_cache=False)
cfg, m = llm.config, llm.model
caches = {'fp32': llm.engine.cache,
          'bf16': KVCache(cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, m.max_len, torch.bfloat16)}
D = {(k, meth): llm.new_drafter(meth) for k in caches for meth in ('ar', 'auto')}
cur = [None]
llm.drafter = lambda meth: D[(cur[0], meth)]
params = SamplingParams(max_tokens=256, temperature=temp, top_p=0.9 if temp else 1.0, seed=0)
ids = [llm.apply_chat_template([{"role": "user", "content": q.turns[0]}]) for q in prompts]
for k in caches:
    cur[0] = k; llm.engine.cache = caches[k]; llm.generate(ids[:1], params, method='ar')
tot = {key: [0, 0, 0.0] for key in D}; same = {key: 0 for key in D}; ar_same = 0
for i in ids:
    outs = {}
    for k in caches:
        cur[0] = k; llm.engine.cache = caches[k]
        for meth in ('ar', 'auto'):
            o = llm._run_to_end(i, params, meth); outs[(k, meth)] = o.token_ids
            t = tot[(k, meth)]; t[0] += o.metrics.tokens; t[1] += o.metrics.steps; t[2] += o.metrics.decode_s
    for key in D: same[key] += outs[key] == outs[(key[0], 'ar')]
    same_ar = outs[('fp32', 'ar')] == outs[('bf16', 'ar')]
    ar_same += same_ar
print(f'bf16-cache ar equals fp32-cache ar on {ar_same}/{len(ids)} prompts')
ar32 = tot[('fp32', 'ar')][0] / tot[('fp32', 'ar')][2]
for key, (n, s, d) in tot.items():
    own_ar = tot[(key[0], 'ar')][0] / tot[(key[0], 'ar')][2]
    print(f"{key[0]} {key[1]:5s} tau {n/s:.2f} {n/d:6.1f} tok/s  {n/d/ar32:.3f}x fp32-ar  {n/d/own_ar:.3f}x own-ar  exact-vs-own-ar {same[key]}/{len(ids)}")
