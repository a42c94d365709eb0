// Byte-level BPE training: the merge loop, exposed to Python as fastlm._C.bpe_train.
//
// The Python side (fastlm/tokenizers.py) splits the corpus with the pre-tokenisation regex, counts
// the unique chunks and hands them here as UTF-8 byte strings with their counts. This file runs the
// merge loop with incremental pair statistics:
//
//   pair_count  : (left, right) -> total occurrences, weighted by chunk count
//   pair_words  : (left, right) -> indices of chunks that contain (or once contained) the pair
//   heap        : (count, pair) entries, lazily invalidated (an entry is live only while its count
//                 equals pair_count[pair]); a fresh entry is pushed whenever a count changes
//
// A merge only rewrites the chunks listed for the chosen pair, and only their pair counts change.
//
// The rules below are the contract shared with the pure-Python fallback
// (fastlm.tokenizers._bpe_train_python); both must give identical merges:
//   * token ids 0..255 are the single bytes; every new token gets the next id;
//   * the chosen pair has the highest count; ties go to the lexicographically smallest
//     (bytes(left), bytes(right)), bytes compared as unsigned, a prefix before its extensions;
//   * occurrences are replaced left to right, without overlap ("aaa" -> "[aa] a");
//   * a token is its byte string: if bytes(left) + bytes(right) is already a token (reachable by
//     another split, e.g. "ab"+"c" and "a"+"bc"), the pair is replaced by that token and no new
//     token or merge is recorded (the mergeable ranks handed to tiktoken stay a bijection);
//   * the loop stops after num_merges new tokens, or earlier when no pair is left.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <queue>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace fastlm {
namespace {

using PairKey = uint64_t;

inline PairKey pair_key(int32_t left, int32_t right) {
  return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) | static_cast<uint32_t>(right);
}
inline int32_t key_left(PairKey k) { return static_cast<int32_t>(k >> 32); }
inline int32_t key_right(PairKey k) { return static_cast<int32_t>(k & 0xffffffffu); }

struct HeapEntry {
  int64_t count;
  int32_t left;
  int32_t right;
};

class BpeTrainer {
 public:
  BpeTrainer(const std::vector<std::string>& chunks, const std::vector<int64_t>& counts)
      : counts_(counts) {
    vocab_.reserve(256 + 1024);
    for (int b = 0; b < 256; ++b) {
      vocab_.emplace_back(1, static_cast<char>(b));
      ids_.emplace(vocab_.back(), b);
    }
    words_.resize(chunks.size());
    for (size_t w = 0; w < chunks.size(); ++w) {
      const std::string& s = chunks[w];
      std::vector<int32_t>& sym = words_[w];
      sym.reserve(s.size());
      for (unsigned char ch : s) sym.push_back(static_cast<int32_t>(ch));
      const int64_t c = counts_[w];
      if (c == 0) continue;
      for (size_t i = 0; i + 1 < sym.size(); ++i) {
        const PairKey k = pair_key(sym[i], sym[i + 1]);
        pair_count_[k] += c;
        pair_words_[k].push_back(static_cast<int32_t>(w));
      }
    }
    seen_stamp_.assign(words_.size(), -1);
    for (const auto& kv : pair_count_) heap_.push({kv.second, key_left(kv.first), key_right(kv.first)});
  }

  std::vector<std::pair<int32_t, int32_t>> run(int64_t num_merges) {
    std::vector<std::pair<int32_t, int32_t>> merges;
    int64_t step = 0;
    while (static_cast<int64_t>(merges.size()) < num_merges) {
      HeapEntry best;
      if (!pop_live(&best)) break;
      const std::string joined = vocab_[best.left] + vocab_[best.right];
      int32_t token;
      auto found = ids_.find(joined);
      if (found != ids_.end()) {
        token = found->second;  // already a token: replace the pair, record nothing
      } else {
        token = static_cast<int32_t>(vocab_.size());
        vocab_.push_back(joined);
        ids_.emplace(joined, token);
        merges.emplace_back(best.left, best.right);
      }
      apply_merge(best.left, best.right, token, step++);
    }
    return merges;
  }

 private:
  // Max-heap order: higher count first; on equal counts the smaller (bytes(left), bytes(right)).
  struct Lower {
    const std::vector<std::string>* vocab;
    bool operator()(const HeapEntry& x, const HeapEntry& y) const {
      if (x.count != y.count) return x.count < y.count;
      const int c = (*vocab)[x.left].compare((*vocab)[y.left]);
      if (c != 0) return c > 0;
      return (*vocab)[x.right].compare((*vocab)[y.right]) > 0;
    }
  };

  bool pop_live(HeapEntry* out) {
    while (!heap_.empty()) {
      HeapEntry e = heap_.top();
      heap_.pop();
      auto it = pair_count_.find(pair_key(e.left, e.right));
      if (it != pair_count_.end() && it->second == e.count && e.count > 0) {
        *out = e;
        return true;
      }
    }
    return false;
  }

  void apply_merge(int32_t left, int32_t right, int32_t token, int64_t step) {
    const PairKey merged = pair_key(left, right);
    auto listed = pair_words_.find(merged);
    if (listed == pair_words_.end()) return;
    std::vector<int32_t> candidates = std::move(listed->second);
    pair_words_.erase(listed);

    delta_.clear();
    for (int32_t w : candidates) {
      if (seen_stamp_[w] == step) continue;  // listed twice
      seen_stamp_[w] = step;
      std::vector<int32_t>& sym = words_[w];
      const size_t n = sym.size();
      bool hit = false;
      for (size_t i = 0; i + 1 < n; ++i) {
        if (sym[i] == left && sym[i + 1] == right) {
          hit = true;
          break;
        }
      }
      if (!hit) continue;  // stale entry: the pair left this chunk in an earlier merge
      const int64_t c = counts_[w];
      for (size_t i = 0; i + 1 < n; ++i) delta_[pair_key(sym[i], sym[i + 1])] -= c;
      size_t j = 0;
      for (size_t i = 0; i < n;) {
        if (i + 1 < n && sym[i] == left && sym[i + 1] == right) {
          sym[j++] = token;
          i += 2;
        } else {
          sym[j++] = sym[i++];
        }
      }
      sym.resize(j);
      for (size_t i = 0; i + 1 < j; ++i) {
        const PairKey k = pair_key(sym[i], sym[i + 1]);
        delta_[k] += c;
        // Only pairs touching the new token can be new to this chunk.
        if (sym[i] == token || sym[i + 1] == token) pair_words_[k].push_back(w);
      }
    }
    for (const auto& kv : delta_) {
      if (kv.second == 0) continue;
      auto it = pair_count_.find(kv.first);
      int64_t now = (it == pair_count_.end() ? 0 : it->second) + kv.second;
      if (now <= 0) {
        if (it != pair_count_.end()) pair_count_.erase(it);
        continue;
      }
      if (it == pair_count_.end()) {
        pair_count_.emplace(kv.first, now);
      } else {
        it->second = now;
      }
      heap_.push({now, key_left(kv.first), key_right(kv.first)});
    }
  }

  std::vector<std::string> vocab_;
  std::unordered_map<std::string, int32_t> ids_;
  std::vector<std::vector<int32_t>> words_;
  std::vector<int64_t> counts_;
  std::vector<int64_t> seen_stamp_;
  std::unordered_map<PairKey, int64_t> pair_count_;
  std::unordered_map<PairKey, std::vector<int32_t>> pair_words_;
  std::unordered_map<PairKey, int64_t> delta_;
  std::priority_queue<HeapEntry, std::vector<HeapEntry>, Lower> heap_{Lower{&vocab_}};
};

std::vector<std::pair<int32_t, int32_t>> bpe_train(const std::vector<std::string>& words,
                                                   const std::vector<int64_t>& counts,
                                                   int64_t num_merges) {
  if (words.size() != counts.size()) {
    throw std::invalid_argument("bpe_train: words and counts differ in length (" +
                                std::to_string(words.size()) + " vs " +
                                std::to_string(counts.size()) + ")");
  }
  if (num_merges < 0) {
    throw std::invalid_argument("bpe_train: num_merges must be >= 0, got " + std::to_string(num_merges));
  }
  if (words.size() > static_cast<size_t>(INT32_MAX)) {
    throw std::invalid_argument("bpe_train: too many distinct chunks (more than 2^31 - 1)");
  }
  for (int64_t c : counts) {
    if (c < 0) throw std::invalid_argument("bpe_train: counts must be >= 0, got " + std::to_string(c));
  }
  py::gil_scoped_release no_gil;
  BpeTrainer trainer(words, counts);
  return trainer.run(num_merges);
}

}  // namespace

void register_bpe(py::module_& m) {
  m.def("bpe_train", &bpe_train, py::arg("words"), py::arg("counts"), py::arg("num_merges"),
        "Byte-level BPE merge loop. words: distinct pre-tokenised chunks (bytes), counts: their "
        "frequencies, num_merges: new tokens to learn. Returns the merges [(left_id, right_id), ...]; "
        "merge i creates token 256 + i. Ties: highest count, then smallest (bytes(left), "
        "bytes(right)). Identical to fastlm.tokenizers._bpe_train_python.");
}

}  // namespace fastlm
