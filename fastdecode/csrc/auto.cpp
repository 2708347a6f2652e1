// `auto`'s merge and scoring (drafters/auto.py, AutoDrafter._merge / _propose / update, which this
// equals): the members' trees merged into one trie, each node keyed per proposing member by
// (member, depth, sibling rank, agreement, seen), scored by its parent's score times the best
// learned conditional rate among its keys, the nodes ranked by score; after Python picks the size
// (StepCost stays in Python), the kept nodes as a tree; and the statistics updated from a
// verified step. The same doubles in the same order as the Python code, the same stable sorts,
// so the same trees and rates (tests/test_drafter_auto.py drives both side by side).
// Why: in Python this was ~0.1-0.2 ms of a ~10 ms sampled step (~40 candidate nodes, dict
// lookups per key), all of it beside the forward.
#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <tuple>
#include <unordered_map>
#include <vector>

#include <c10/util/Exception.h>
#include <torch/custom_class.h>
#include <torch/library.h>

namespace {

// A key's parts packed: member (8 bits), depth (16), rank (8), agreement (8), seen (8).
inline int64_t pack_key(int64_t member, int64_t depth, int64_t rank, int64_t agree, int64_t seen) {
  return (member << 48) | (depth << 24) | (rank << 16) | (agree << 8) | seen;
}

constexpr int64_t kMaxToken = int64_t(1) << 20;

// Three tokens (each >= -1, < kMaxToken) as one word: the trigram table's key.
inline uint64_t pack_trigram(int64_t a, int64_t b, int64_t c) {
  return (uint64_t(a + 1) << 42) | (uint64_t(b + 1) << 21) | uint64_t(c + 1);
}

}  // namespace

struct AutoCore : torch::CustomClassHolder {
  double base_rate, prior_weight, max_trials;
  int64_t max_rank, max_agree, max_seen;
  bool use_seen = true;
  std::unordered_map<int64_t, std::array<double, 2>> stats;  // key -> (hits, trials)
  std::unordered_map<int64_t, double> rates;                  // rate(), until the next update
  std::unordered_map<uint64_t, int64_t> trigrams;             // the request's context: trigram -> count
  std::vector<int64_t> context;                                // the request's tokens seen so far
  // the last score(): merged nodes (parents first) and their keys, scores and the ranking
  std::vector<int64_t> tokens, parents;
  std::vector<std::vector<int64_t>> keys;
  std::vector<double> scores;
  std::vector<int64_t> order;
  // the last take(): per kept node, its keys and its tree-local parent
  std::vector<std::pair<std::vector<int64_t>, int64_t>> chosen;

  AutoCore(double base_rate, double prior_weight, double max_trials, int64_t max_rank, int64_t max_agree,
           int64_t max_seen)
      : base_rate(base_rate), prior_weight(prior_weight), max_trials(max_trials), max_rank(max_rank),
        max_agree(max_agree), max_seen(max_seen) {}

  void begin() {
    trigrams.clear();
    context.clear();
  }

  void set_use_seen(bool on) { use_seen = on; }

  // The request's context grew by `more` tokens: count the trigrams ending in them.
  void extend(const std::vector<int64_t>& more) {
    for (int64_t t : more) {
      TORCH_CHECK(t >= -1 && t < kMaxToken, "AutoCore: token ", t, " is outside [-1, ", kMaxToken, ")");
      context.push_back(t);
      const size_t j = context.size() - 1;
      if (j >= 2) trigrams[pack_trigram(context[j - 2], context[j - 1], t)] += 1;
    }
  }

  int64_t trigram_count(int64_t a, int64_t b, int64_t c) const {
    auto found = trigrams.find(pack_trigram(a, b, c));
    return found == trigrams.end() ? 0 : found->second;
  }

  double rate_of(int64_t key) {
    auto memo = rates.find(key);
    if (memo != rates.end()) return memo->second;
    const int64_t depth = (key >> 24) & 0xFFFF;
    const double prior = depth <= 1 ? base_rate : rate_of(key - (int64_t(1) << 24));
    auto s = stats.find(key);
    const double hits = s == stats.end() ? 0.0 : s->second[0], trials = s == stats.end() ? 0.0 : s->second[1];
    const double rate = (hits + prior_weight * prior) / (trials + prior_weight);
    rates[key] = rate;
    return rate;
  }

  double rate(int64_t member, int64_t depth, int64_t rank, int64_t agree, int64_t seen) {
    return rate_of(pack_key(member, depth, rank, agree, seen));
  }

  // The members' trees, member by member (member ids `members`, `sizes` nodes each, their tokens
  // and tree-local parents concatenated): merge, key, score and rank. Returns the best `budget`
  // scores, best first (ties: the earlier merged node first).
  std::vector<double> score(const std::vector<int64_t>& members, const std::vector<int64_t>& sizes,
                            const std::vector<int64_t>& member_tokens, const std::vector<int64_t>& member_parents,
                            int64_t budget) {
    TORCH_CHECK(members.size() == sizes.size(), "AutoCore.score: ", members.size(), " members but ", sizes.size(),
                " sizes");
    TORCH_CHECK(member_tokens.size() == member_parents.size(), "AutoCore.score: tokens and parents differ in length");
    tokens.clear();
    parents.clear();
    std::vector<int64_t> depths;
    std::vector<std::vector<std::pair<int64_t, int64_t>>> proposed;  // per node: (member, sibling rank)
    std::unordered_map<uint64_t, int64_t> index;                    // (merged parent, token) -> node
    size_t offset = 0;
    for (size_t m = 0; m < members.size(); ++m) {
      TORCH_CHECK(sizes[m] >= 0 && offset + sizes[m] <= member_tokens.size(), "AutoCore.score: sizes overrun the tokens");
      std::vector<int64_t> local(sizes[m]);
      std::unordered_map<int64_t, int64_t> sibling_rank;
      for (int64_t i = 0; i < sizes[m]; ++i) {
        const int64_t token = member_tokens[offset + i], parent = member_parents[offset + i];
        TORCH_CHECK(token >= 0 && token < kMaxToken, "AutoCore.score: token ", token, " is outside [0, ", kMaxToken, ")");
        TORCH_CHECK(parent >= -1 && parent < i, "AutoCore.score: member ", members[m], "'s node ", i, " has parent ",
                    parent);
        const int64_t merged_parent = parent < 0 ? -1 : local[parent];
        const int64_t rank = sibling_rank[parent]++;
        const uint64_t pair = (uint64_t(merged_parent + 1) << 32) | uint64_t(token);
        auto found = index.find(pair);
        int64_t idx;
        if (found == index.end()) {
          idx = static_cast<int64_t>(tokens.size());
          index.emplace(pair, idx);
          tokens.push_back(token);
          parents.push_back(merged_parent);
          depths.push_back(merged_parent < 0 ? 1 : depths[merged_parent] + 1);
          proposed.push_back({{members[m], rank}});
        } else {
          idx = found->second;
          proposed[idx].emplace_back(members[m], rank);
        }
        local[i] = idx;
      }
      offset += sizes[m];
    }
    const int64_t n = static_cast<int64_t>(tokens.size());
    const int64_t a = context.size() >= 2 ? context[context.size() - 2] : -1;
    const int64_t b = context.size() >= 2 ? context[context.size() - 1] : -1;
    keys.assign(n, {});
    scores.assign(n, 0.0);
    for (int64_t i = 0; i < n; ++i) {
      int64_t seen = 0;
      if (use_seen) {
        uint64_t tri;
        if (parents[i] < 0) {
          tri = pack_trigram(a, b, tokens[i]);
        } else {
          const int64_t grand = parents[parents[i]];
          tri = pack_trigram(grand >= 0 ? tokens[grand] : b, tokens[parents[i]], tokens[i]);
        }
        auto c = trigrams.find(tri);
        seen = std::min(c == trigrams.end() ? int64_t(0) : c->second, max_seen);
      }
      int64_t agree = 1;
      if (proposed[i].size() > 1) {
        std::vector<int64_t> names;
        for (const auto& p : proposed[i]) names.push_back(p.first);
        std::sort(names.begin(), names.end());
        agree = std::min<int64_t>(std::unique(names.begin(), names.end()) - names.begin(), max_agree);
      }
      double best = 0.0;
      for (const auto& [member, rank] : proposed[i]) {
        const int64_t key = pack_key(member, depths[i], std::min(rank, max_rank), agree, seen);
        keys[i].push_back(key);
        const double r = rate_of(key);
        if (r > best) best = r;
      }
      scores[i] = parents[i] < 0 ? best : best * scores[parents[i]];
    }
    order.resize(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t x, int64_t y) { return scores[x] > scores[y]; });
    if (static_cast<int64_t>(order.size()) > budget) order.resize(std::max<int64_t>(budget, 0));
    std::vector<double> out;
    out.reserve(order.size());
    for (int64_t i : order) out.push_back(scores[i]);
    return out;
  }

  // The best `k` nodes of the last score() as a tree (parents first, as merged).
  std::tuple<std::vector<int64_t>, std::vector<int64_t>> take(int64_t k) {
    TORCH_CHECK(k >= 0 && k <= static_cast<int64_t>(order.size()), "AutoCore.take: k=", k, " is outside [0, ",
                order.size(), "]");
    std::vector<int64_t> keep(order.begin(), order.begin() + k);
    std::sort(keep.begin(), keep.end());
    std::unordered_map<int64_t, int64_t> remap;
    for (size_t j = 0; j < keep.size(); ++j) remap[keep[j]] = static_cast<int64_t>(j);
    std::vector<int64_t> out_tokens, out_parents;
    chosen.clear();
    for (int64_t i : keep) {
      const int64_t parent = parents[i] >= 0 ? remap.at(parents[i]) : -1;
      out_tokens.push_back(tokens[i]);
      out_parents.push_back(parent);
      chosen.emplace_back(keys[i], parent);
    }
    return {out_tokens, out_parents};
  }

  // A verified step: every kept node whose parent's row was accepted is one trial of its keys,
  // a hit if its own row was (row 0 = the root, row i + 1 = kept node i).
  void update(const std::vector<int64_t>& accepted_rows) {
    rates.clear();
    std::vector<char> accepted(chosen.size() + 1, 0);
    for (int64_t r : accepted_rows)
      if (r >= 0 && r <= static_cast<int64_t>(chosen.size())) accepted[r] = 1;
    for (size_t i = 0; i < chosen.size(); ++i) {
      if (!accepted[chosen[i].second + 1]) continue;  // never had a chance
      const double hit = accepted[i + 1] ? 1.0 : 0.0;
      for (int64_t key : chosen[i].first) {
        auto& s = stats[key];
        s[0] += hit;
        s[1] += 1.0;
        if (s[1] > max_trials) {
          s[0] /= 2;
          s[1] /= 2;
        }
      }
    }
  }

  // The statistics as (member, depth, rank, agreement, seen, hits, trials) rows, for scripts and tests.
  std::vector<std::vector<double>> stats_rows() const {
    std::vector<std::vector<double>> rows;
    for (const auto& [key, s] : stats)
      rows.push_back({double(key >> 48), double((key >> 24) & 0xFFFF), double((key >> 16) & 0xFF),
                      double((key >> 8) & 0xFF), double(key & 0xFF), s[0], s[1]});
    return rows;
  }
};

TORCH_LIBRARY_FRAGMENT(fastdecode_kernels, m) {
  m.class_<AutoCore>("AutoCore")
      .def(torch::init<double, double, double, int64_t, int64_t, int64_t>())
      .def("begin", &AutoCore::begin)
      .def("set_use_seen", &AutoCore::set_use_seen)
      .def("extend", &AutoCore::extend)
      .def("trigram_count", &AutoCore::trigram_count)
      .def("rate", &AutoCore::rate)
      .def("score", &AutoCore::score)
      .def("take", &AutoCore::take)
      .def("update", &AutoCore::update)
      .def("stats_rows", &AutoCore::stats_rows);
}
