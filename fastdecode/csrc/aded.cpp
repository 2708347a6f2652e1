// ADED's tri-gram counts and PUCT draft search (drafters/aded.py), native: the same counts, the
// same walk, the same floating-point steps in the same order, so a tree is the one the Python
// search builds from the same counts (tests/test_drafter_aded.py compares them).
//
// Why: inside `auto` the Python search and counting cost ~0.26 ms of a ~10 ms sampled step
// (scripts/step_split.py), for a member whose nodes add ~0.03 tau.
//
// Counts keep their tokens in first-seen order, as Python dicts do: continuations are the top_m
// by count with ties in that order (a stable sort), their probability count / total in double.
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <unordered_map>
#include <utility>
#include <vector>

namespace {

struct Counts {
  std::vector<std::pair<int64_t, int64_t>> items;  // (token, count), first-seen order
  std::unordered_map<int64_t, int64_t> where;      // token -> its index in items

  void add(int64_t token, int64_t weight) {
    const auto it = where.find(token);
    if (it == where.end()) {
      where.emplace(token, int64_t(items.size()));
      items.emplace_back(token, weight);
    } else {
      items[it->second].second += weight;
    }
  }
};

struct PairHash {
  size_t operator()(const std::pair<int64_t, int64_t>& k) const {
    return std::hash<int64_t>()(k.first * 1000003 ^ k.second);
  }
};

struct SearchNode {
  int64_t token, prev, draft_index;
  double path_prob;
  int64_t visits = 0;
  double value_sum = 0.0;
  std::vector<std::pair<int64_t, int64_t>> children;  // (token, node index), first added first
  std::vector<std::pair<int64_t, double>> options;    // (token, prior), set on the first visit
  bool has_options = false, exhausted = false;

  int64_t child(int64_t t) const {
    for (const auto& [tok, index] : children)
      if (tok == t) return index;
    return -1;
  }
};

}  // namespace

struct AdedTable : torch::CustomClassHolder {
  std::unordered_map<std::pair<int64_t, int64_t>, Counts, PairHash> trigram;
  std::unordered_map<int64_t, Counts> bigram;
  int64_t top_m, max_depth;
  double c_puct;

  AdedTable(int64_t top_m, double c_puct, int64_t max_depth) : top_m(top_m), max_depth(max_depth), c_puct(c_puct) {}

  void observe(int64_t a, int64_t b, int64_t c, int64_t weight) {
    if (a >= 0) trigram[{a, b}].add(c, weight);
    bigram[b].add(c, weight);
  }

  // c = triples[3i + 2] followed (triples[3i], triples[3i + 1]) for every i.
  void observe_many(std::vector<int64_t> triples) {
    for (size_t i = 0; i + 2 < triples.size(); i += 3) observe(triples[i], triples[i + 1], triples[i + 2], 1);
  }

  // Aded._learn_sequence: the tokens after the two before them (a, b), then observe_many(triples)
  // (one call a step: a call costs more than the counting); returns the new last two.
  std::tuple<int64_t, int64_t> learn(std::vector<int64_t> tokens, int64_t a, int64_t b, std::vector<int64_t> triples) {
    for (const int64_t c : tokens) {
      if (b >= 0) observe(a, b, c, 1);
      a = b;
      b = c;
    }
    observe_many(std::move(triples));
    return {a, b};
  }

  const Counts* counts(int64_t prev, int64_t token) const {
    const auto t = trigram.find({prev, token});
    if (t != trigram.end() && !t->second.items.empty()) return &t->second;
    const auto b = bigram.find(token);
    return b != bigram.end() && !b->second.items.empty() ? &b->second : nullptr;
  }

  std::vector<std::pair<int64_t, double>> continuations(int64_t prev, int64_t token) const {
    const Counts* c = counts(prev, token);
    if (c == nullptr) return {};
    int64_t total = 0;
    for (const auto& item : c->items) total += item.second;
    std::vector<std::pair<int64_t, int64_t>> best(c->items);
    std::stable_sort(best.begin(), best.end(), [](const auto& x, const auto& y) { return x.second > y.second; });
    best.resize(std::min<size_t>(best.size(), size_t(std::max<int64_t>(top_m, 0))));
    std::vector<std::pair<int64_t, double>> out;
    for (const auto& [tok, n] : best) out.emplace_back(tok, double(n) / double(total));
    return out;
  }

  // As a dict would list them: (tokens, counts) of the trigram (a, b), or of the bigram b when a < 0.
  std::tuple<std::vector<int64_t>, std::vector<int64_t>> table(int64_t a, int64_t b) const {
    const Counts* c = nullptr;
    if (a >= 0) {
      const auto t = trigram.find({a, b});
      if (t != trigram.end()) c = &t->second;
    } else {
      const auto t = bigram.find(b);
      if (t != bigram.end()) c = &t->second;
    }
    std::vector<int64_t> tokens, counts;
    if (c != nullptr)
      for (const auto& [tok, n] : c->items) tokens.push_back(tok), counts.push_back(n);
    return {tokens, counts};
  }

  // Aded.propose: the draft tree (tokens, parents) rooted at `token` (after `prev`), at most `budget` nodes.
  std::tuple<std::vector<int64_t>, std::vector<int64_t>> propose(int64_t prev, int64_t token, int64_t budget) const {
    std::vector<int64_t> tokens, parents;
    if (budget <= 0) return {tokens, parents};
    std::vector<SearchNode> nodes;
    nodes.push_back(SearchNode{token, prev, -1, 1.0});
    std::vector<int64_t> path;
    for (int64_t round = 0; round < 2 * budget + 8; ++round) {  // bounded: dead ends waste a simulation
      path.assign(1, 0);
      int64_t node = 0, depth = 0;
      double value = 0.0;
      while (true) {
        if (!nodes[node].has_options) {
          if (depth < max_depth) nodes[node].options = continuations(nodes[node].prev, nodes[node].token);
          nodes[node].has_options = true;
        }
        // PUCT: mean value plus a prior-weighted bonus that shrinks with the child's visits
        const SearchNode& n = nodes[node];
        const double explore = c_puct * std::sqrt(double(n.visits + 1));
        int64_t pick = -1;
        double best = -1.0;
        for (size_t i = 0; i < n.options.size(); ++i) {
          const auto [tok, prior] = n.options[i];
          const int64_t c = n.child(tok);
          double score;
          if (c < 0) {
            score = prior * explore;
          } else if (nodes[c].exhausted) {
            continue;
          } else {
            score = nodes[c].value_sum / double(nodes[c].visits) + prior * explore / double(1 + nodes[c].visits);
          }
          if (score > best) pick = int64_t(i), best = score;
        }
        if (pick < 0) {
          nodes[node].exhausted = true;  // never walked into again
          value = 0.0;
          break;
        }
        const auto [tok, prior] = nodes[node].options[pick];
        const int64_t c = nodes[node].child(tok);
        if (c < 0) {
          const int64_t index = int64_t(tokens.size());
          tokens.push_back(tok);
          parents.push_back(nodes[node].draft_index);
          SearchNode fresh{tok, nodes[node].token, index, nodes[node].path_prob * prior};
          value = fresh.path_prob;
          nodes.push_back(std::move(fresh));
          nodes[node].children.emplace_back(tok, int64_t(nodes.size()) - 1);
          path.push_back(int64_t(nodes.size()) - 1);
          break;
        }
        path.push_back(c);
        node = c;
        ++depth;
      }
      for (const int64_t visited : path) {
        nodes[visited].visits += 1;
        nodes[visited].value_sum += value;
      }
      if (int64_t(tokens.size()) >= budget || nodes[0].exhausted) break;
    }
    return {tokens, parents};
  }
};

TORCH_LIBRARY_FRAGMENT(fastdecode_kernels, m) {
  m.class_<AdedTable>("AdedTable")
      .def(torch::init<int64_t, double, int64_t>())
      .def("observe", &AdedTable::observe)
      .def("learn", &AdedTable::learn)
      .def("table", &AdedTable::table)
      .def("propose", &AdedTable::propose);
}
