"""The lexical side and hybrid scores: TF-IDF over the titles' character
n-grams, and an embedding's cosine fused with TF-IDF's.

score(a, b) = w cos(embedding_a, embedding_b) + (1 - w) cos(tfidf_a, tfidf_b)

`fuse` writes it as rows (sqrt(w) x the unit embedding beside sqrt(1 - w) x
the unit TF-IDF row), so the exact searches and every metric take fused
rows as they take any other: an inner product of two fused rows is the
fused score. `fit_weight` picks w on a labelled split (same-product ids) by
its macro Recall@10 (macro MAP@10 breaks ties, then the smaller weight:
the words, which need no model, win a draw); the weight is then applied, as
it is, to another split.

Without labels to fit w on, reciprocal rank fusion (Cormack, Clarke and
Buettcher, 2009) joins the two rankings instead: score = sum over the two
of 1 / (RRF_CONSTANT + rank), each ranking read to RRF_DEPTH listings (or
k, if deeper), a listing that shares nothing with the query on one side
(score exactly 0) unranked there. It needs no weight, and it ignores how
far apart the scores are, which is what a fitted w uses.
"""

import re

import numpy as np
import scipy.sparse
from sklearn.feature_extraction.text import TfidfVectorizer

from item_jax.eval.metrics import (NO_NEIGHBOUR, SparseCandidates,
                                   retrieval_metrics, retrieval_queries,
                                   same_product_retrieval, top_k_neighbours)

NGRAM_RANGE = (2, 4)   # character n-grams of 2, 3 and 4
# The lexical side, as "ANALYZER:LOW-HIGH": "char" n-grams run across words
# (the evaluation's TF-IDF baseline, the default), "char_wb" n-grams stay
# within words (each word padded by a space). `lexical_side` reads it.
LEXICAL = "char:2-4"
ANALYZERS = ("char", "char_wb")

# w = 0 is TF-IDF alone, w = 1 the embedding alone.
FUSION_WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
FIT_METRICS = ("macro_recall@10", "macro_map@10")
# Reciprocal rank fusion: the constant is the paper's (and Elasticsearch's,
# OpenSearch's default); each ranking is read this deep.
RRF_CONSTANT = 60
RRF_DEPTH = 100


def lexical_side(spec: str = LEXICAL) -> tuple[str, tuple[int, int]]:
  """(analyzer, (low, high)) of a lexical side "ANALYZER:LOW-HIGH" (LEXICAL);
  a malformed one is a ValueError naming what is expected."""
  match = re.fullmatch(r"(\w+):(\d+)(?:-(\d+))?", str(spec))
  analyzer = match and match.group(1)
  ngram_range = match and (int(match.group(2)), int(match.group(3) or match.group(2)))
  if analyzer not in ANALYZERS or not (1 <= ngram_range[0] <= ngram_range[1] <= 8):
    raise ValueError(f"lexical side {spec!r}: expected ANALYZER:LOW-HIGH with "
                     f"ANALYZER one of {', '.join(ANALYZERS)} and 1 <= LOW <= "
                     "HIGH <= 8, e.g. char:2-4 (the default) or char_wb:3-3")
  return analyzer, ngram_range


def lexical_name(spec: str = LEXICAL) -> str:
  """A lexical side's one spelling, "ANALYZER:LOW-HIGH" ("char_wb:3" ->
  "char_wb:3-3"), checked as `lexical_side` checks it."""
  analyzer, (low, high) = lexical_side(spec)
  return f"{analyzer}:{low}-{high}"


def tfidf_vectorizer(ngram_range=NGRAM_RANGE, analyzer: str = "char") -> TfidfVectorizer:
  """scikit-learn's TF-IDF over character n-grams, as the baseline uses it.

  Each title is lower-cased, its whitespace runs made single spaces, and a
  space put at each end, so that word beginnings and ends are n-grams of
  their own; n-grams run across words ("b c" is one of "ab c"). Term
  frequency is 1 + log(count), idf is log((1 + N) / (1 + df)) + 1, rows are
  L2-normalised. This reproduces the hand-written n-grams and weights it
  replaces (cosines equal to 1e-6), so earlier reports' TF-IDF figures stand.

  `analyzer="char_wb"` (sklearn's) pads every word instead and never crosses
  a space. On 12,000 synthetic listings split by sibling group it retrieves
  better (macro R@10 0.868 against 0.857 with groups of 2-3, 0.677 against
  0.661 with groups of 5-8 as in the demo; MAP@10 +2.6 and +5.0 points) but
  classifies a little worse (k-NN 0.951 against 0.954, 0.937 against 0.945;
  probe equal): a stronger retrieval bar, and a change of the baseline, so
  the default keeps "char"; the lexical side of the fused entries and of
  `neighbours` can take either (`lexical_side`; BENCHMARKS.md, "Hybrid
  neighbours").
  """
  return TfidfVectorizer(analyzer=analyzer, preprocessor=_padded_title,
                         ngram_range=tuple(ngram_range), sublinear_tf=True,
                         smooth_idf=True, norm="l2", dtype=np.float32)


def lexical_vectorizer(spec: str = LEXICAL) -> TfidfVectorizer:
  """`tfidf_vectorizer` of a lexical side "ANALYZER:LOW-HIGH"."""
  analyzer, ngram_range = lexical_side(spec)
  return tfidf_vectorizer(ngram_range, analyzer)


def _padded_title(title: str) -> str:
  return " " + " ".join(title.lower().split()) + " "


def tfidf_features(titles_by_split: dict, lexical: str = LEXICAL) -> dict:
  """{split: (n, features) scipy CSR float32} TF-IDF rows of every split's
  titles (`lexical_vectorizer`: the lexical side "ANALYZER:LOW-HIGH",
  `lexical_side`; the baseline's by default).

  The vocabulary and document frequencies come from all the given titles
  together (no labels are read). Rows are L2-normalised over every n-gram,
  then only n-grams found in two or more titles are kept as columns: the
  others add nothing to any dot product between two titles, so cosine
  similarities stay exact (a title's cosine with itself may fall below 1).
  The rows stay sparse: the metrics take them as they are.
  """
  splits = list(titles_by_split)
  titles = [title for split in splits for title in titles_by_split[split]]
  if not titles:
    raise ValueError("tfidf_features needs at least one title")
  matrix = lexical_vectorizer(lexical).fit_transform(titles).tocsr()
  document_frequency = np.bincount(matrix.indices, minlength=matrix.shape[1])
  matrix = matrix[:, np.flatnonzero(document_frequency >= 2)]
  features, start = {}, 0
  for split in splits:
    features[split] = matrix[start:start + len(titles_by_split[split])]
    start += len(titles_by_split[split])
  return features


class FittedTfidf:
  """`tfidf_vectorizer`'s TF-IDF fitted once on some titles and applied to
  any others (`transform`), as `item-jax categorize --features hybrid` keeps
  it: the n-grams (at most `max_ngrams` of the most frequent found in
  `min_df` or more fit titles) and their idf. Rows are L2-normalised over
  those n-grams; a title's unknown n-grams are dropped.

  Saved without pickle: `ngrams` (a list of strings, json) and `idf`
  (float32, safetensors); `FittedTfidf(ngrams, idf)` gives the same rows."""

  def __init__(self, ngrams, idf, ngram_range=NGRAM_RANGE):
    self.ngrams, self.idf = list(ngrams), np.asarray(idf, np.float32)
    if len(self.ngrams) != len(self.idf):
      raise ValueError(f"{len(self.ngrams)} n-grams but {len(self.idf)} idf values")
    self.ngram_range = tuple(ngram_range)
    self._vectorizer = tfidf_vectorizer(self.ngram_range)
    self._vectorizer.set_params(vocabulary=self.ngrams)
    self._vectorizer.idf_ = self.idf

  @classmethod
  def fit(cls, titles, min_df: int = 2, max_ngrams: int | None = 2 ** 17,
          ngram_range=NGRAM_RANGE) -> "FittedTfidf":
    titles = list(titles)
    if not titles:
      raise ValueError("FittedTfidf.fit needs at least one title")
    vectorizer = tfidf_vectorizer(ngram_range)
    vectorizer.set_params(min_df=min(min_df, len(titles)), max_features=max_ngrams)
    try:
      vectorizer.fit(titles)
    except ValueError:   # no n-gram in min_df titles: keep every one
      vectorizer.set_params(min_df=1).fit(titles)
    return cls(vectorizer.get_feature_names_out().tolist(), vectorizer.idf_,
               ngram_range)

  def transform(self, titles) -> scipy.sparse.csr_matrix:
    """(len(titles), len(ngrams)) float32 CSR rows."""
    return self._vectorizer.transform(list(titles)).tocsr()


def unit_rows(dense: np.ndarray) -> np.ndarray:
  """Rows scaled to unit length; all-zero rows stay zero."""
  dense = np.asarray(dense, np.float32)
  norms = np.linalg.norm(dense, axis=1, keepdims=True)
  return dense / np.maximum(norms, 1e-12)


def fuse(dense: np.ndarray, sparse, weight: float) -> scipy.sparse.csr_matrix:
  """Rows whose inner products are `weight` x the cosine of `dense`'s rows
  plus (1 - `weight`) x the inner product of `sparse`'s (unit) rows."""
  if not 0.0 <= weight <= 1.0:
    raise ValueError(f"fusion weight {weight} is not in [0, 1]")
  return fuse_blocks([dense], sparse, (weight, 1.0 - weight))


def fuse_blocks(dense_blocks, sparse, weights) -> scipy.sparse.csr_matrix:
  """Rows whose inner products are sum_i weights[i] x the cosine of
  `dense_blocks[i]`'s rows, plus weights[-1] x the inner product of
  `sparse`'s (unit) rows: several embeddings of the same listings (e.g.
  ITEm's and an off-the-shelf photo model's) fused with the words."""
  weights = tuple(float(w) for w in weights)
  if len(weights) != len(dense_blocks) + 1:
    raise ValueError(f"{len(weights)} fusion weights for {len(dense_blocks)} "
                     "embeddings and the words: one each")
  if min(weights) < 0.0 or abs(sum(weights) - 1.0) > 1e-6:
    raise ValueError(f"fusion weights {weights} must be >= 0 and sum to 1")
  for dense in dense_blocks:
    if dense.shape[0] != sparse.shape[0]:
      raise ValueError(f"{dense.shape[0]} embedding rows against {sparse.shape[0]} "
                       "TF-IDF rows")
  fused = scipy.sparse.hstack(
      [scipy.sparse.csr_matrix(unit_rows(dense) * np.float32(np.sqrt(weight)))
       for dense, weight in zip(dense_blocks, weights)]
      + [scipy.sparse.csr_matrix(sparse, dtype=np.float32)
         * np.float32(np.sqrt(weights[-1]))], format="csr")
  fused.eliminate_zeros()
  return fused


def hybrid_blocks(query_vectors: np.ndarray, query_titles: list[str],
                  index_vectors: np.ndarray | None, index_titles: list[str] | None,
                  k: int, weight: float, *, block_rows: int, start_row: int = 0,
                  lexical: str = LEXICAL, query_photos: np.ndarray | None = None,
                  index_photos: np.ndarray | None = None, weights=None):
  """(first query row, scores, indices) of each block of `block_rows` query
  rows from `start_row` on, ranked by the fused score (`fuse`; weight 0 is
  TF-IDF alone), exactly: every candidate is scored. The arrays are as
  `item_jax.eval.neighbours.neighbour_blocks` yields them (best first, ties
  to the lower index row, NO_NEIGHBOUR and -inf past the candidates);
  `index_vectors=None` searches the queries against themselves, each row's
  own excluded.

  With `query_photos` (and `index_photos` beside an index), a second
  embedding of the same listings (an off-the-shelf photo model's; zero rows
  for listings without a photo) joins the score: `weights` (the embedding's,
  the photos', the words'; they sum to 1) replace `weight`, as `fuse_blocks`
  takes them.

  TF-IDF (the lexical side `lexical`, "ANALYZER:LOW-HIGH") is fitted on
  the queries' and the index's titles together; both
  sides' fused rows are held in memory (the embeddings as float32, the
  n-grams sparse), the candidates prepared once for every block
  (`SparseCandidates`).
  """
  tfidf = _paired_tfidf(query_vectors, query_titles, index_vectors, index_titles,
                        lexical)
  if (query_photos is None) != (weights is None) or (
      query_photos is not None and index_vectors is not None and index_photos is None):
    raise ValueError("photo rows need the three weights, and the index's photo "
                     "rows beside the queries'")

  def rows(vectors, photos, words):
    if photos is None:
      return fuse(np.asarray(vectors, np.float32), words, weight)
    return fuse_blocks([np.asarray(vectors, np.float32), np.asarray(photos, np.float32)],
                       words, weights)

  queries = rows(query_vectors, query_photos, tfidf["queries"])
  candidates = queries if index_vectors is None else rows(
      index_vectors, index_photos, tfidf["index"])
  prepared = SparseCandidates(candidates)
  for first in range(start_row, queries.shape[0], block_rows):
    block = queries[first:first + block_rows]
    exclude = first + np.arange(block.shape[0]) if index_vectors is None else None
    scores, indices = prepared.search(block, k, exclude=exclude)
    yield first, scores, indices


def fit_weight(dense: np.ndarray, sparse, product_ids: np.ndarray,
               category_ids: np.ndarray, weights=FUSION_WEIGHTS,
               mesh=None) -> tuple[float, dict]:
  """(the best weight, {weight: macro Recall@10}) for same-product
  retrieval on these labelled listings."""
  return _best_fusion(((weight, weight, lambda weight=weight: fuse(dense, sparse, weight))
                       for weight in weights), product_ids, category_ids, mesh)


def fit_added_weight(dense: np.ndarray, base_dense: np.ndarray, base_weight: float,
                     sparse, product_ids: np.ndarray, category_ids: np.ndarray,
                     weights=FUSION_WEIGHTS, mesh=None) -> tuple[tuple, dict]:
  """An embedding added to a fitted hybrid of another embedding and the
  words (`base_dense` at `base_weight`, the words at 1 - `base_weight`):
  (the best weights (a, (1 - a) base_weight, (1 - a)(1 - base_weight)) for
  `fuse_blocks([dense, base_dense], sparse, ...)`, {a: macro Recall@10})
  over a in `weights`, ordered as `fit_weight` (a = 0, the hybrid without
  the added embedding, wins a draw)."""
  def tries():
    for added in weights:
      triple = (added, round((1 - added) * base_weight, 6),
                round((1 - added) * (1 - base_weight), 6))
      yield added, triple, lambda: fuse_blocks([dense, base_dense], sparse, triple)
  return _best_fusion(tries(), product_ids, category_ids, mesh)


def _best_fusion(tries, product_ids: np.ndarray, category_ids: np.ndarray,
                 mesh) -> tuple:
  """(the best weights, {label: macro Recall@10}) over `tries`, (label,
  weights, rows()) in order of preference: the higher macro Recall@10, then
  macro MAP@10, then the first tried wins."""
  if not len(retrieval_queries(product_ids)):
    raise ValueError("no listing shares its product with another: nothing to "
                     "fit a fusion weight on")
  scores, best, best_key = {}, None, None
  for label, weights, rows in tries:
    result = same_product_retrieval(rows(), product_ids, category_ids, mesh=mesh)
    key = tuple(result[name] for name in FIT_METRICS)
    scores[label] = key[0]
    if best_key is None or key > best_key:
      best, best_key = weights, key
  return best, scores


class HybridIndex:
  """Listings held in memory for hybrid search from Python (the job's
  `neighbours --rank-by hybrid` or `rrf` on files): each row its embedding
  and its title, TF-IDF fitted on the index's titles.

    index = HybridIndex(embeddings, titles, weight=0.3)
    scores, rows = index.search(query_embeddings, query_titles, k=10)

  `search` gives (scores, index rows) as `top_k_search` does (best first,
  ties to the lower row, -1 past the candidates), every candidate scored by
  `weight` x the embeddings' cosine + (1 - weight) x the titles' TF-IDF
  cosine; `weight=None` ranks by reciprocal rank fusion of the two
  (`reciprocal_rank_fusion`, each side exact to `depth` rows) for a
  catalogue without labels to fit a weight on. `exclude` (one index row per
  query, or -1) leaves a row out, e.g. each listing itself when the queries
  are the index. `lexical` is the lexical side ("ANALYZER:LOW-HIGH",
  `lexical_side`), the one the weight was fitted with.

  With a photo model's rows too (`eval`'s VIEW + MobileNetV2 + TF-IDF
  entries), give `photos` (one row per listing, zero without a photo) here
  and to `search`, and `weight` as its three weights (the embedding, the
  photos, the words; `fuse_blocks`).
  """

  def __init__(self, embeddings: np.ndarray, titles, weight, depth: int = RRF_DEPTH,
               lexical: str = LEXICAL, photos: np.ndarray | None = None):
    three = photos is not None
    if three != isinstance(weight, (tuple, list)):
      raise ValueError("photo rows go with three weights (the embedding, the "
                       "photos, the words), and three weights with photo rows")
    self.weight = (None if weight is None else tuple(map(float, weight)) if three
                   else float(weight))
    self.vectorizer = lexical_vectorizer(lexical)
    if self.weight is None:
      self.candidates = _RankedSides(*self._sides(embeddings, titles, fit=True), depth)
    else:
      self.candidates = SparseCandidates(self._rows(embeddings, titles, fit=True,
                                                    photos=photos))

  def search(self, embeddings: np.ndarray, titles, k: int, exclude=None,
             photos: np.ndarray | None = None):
    if (photos is not None) != isinstance(self.weight, tuple):
      raise ValueError("the queries need photo rows exactly when the index has them")
    if self.weight is None:
      return self.candidates.search(*self._sides(embeddings, titles), k, exclude)
    return self.candidates.search(self._rows(embeddings, titles, photos=photos), k,
                                  exclude=exclude)

  def _sides(self, embeddings: np.ndarray, titles, fit: bool = False):
    """(unit embeddings, TF-IDF rows) of listings (a None title is an empty one)."""
    titles = ["" if title is None else str(title) for title in titles]
    if len(titles) != len(embeddings):
      raise ValueError(f"{len(embeddings)} embeddings but {len(titles)} titles")
    words = (self.vectorizer.fit_transform(titles) if fit
             else self.vectorizer.transform(titles))
    return unit_rows(np.asarray(embeddings, np.float32)), words

  def _rows(self, embeddings: np.ndarray, titles, fit: bool = False, photos=None):
    """Fused rows of listings."""
    dense, words = self._sides(embeddings, titles, fit)
    if photos is None:
      return fuse(dense, words, self.weight)
    if len(photos) != len(dense):
      raise ValueError(f"{len(dense)} embeddings but {len(photos)} photo rows")
    return fuse_blocks([dense, np.asarray(photos, np.float32)], words, self.weight)


def reciprocal_rank_fusion(rankings, k: int, constant: int = RRF_CONSTANT):
  """(scores, indices) of the best k of each query by reciprocal rank fusion.

  `rankings`: (scores, indices) pairs, one per ranking, each (num_queries,
  depth) best first as `top_k_search` gives them. An entry with score 0 (the
  query and the listing share nothing on that side) or past the candidates
  counts for nothing. Results as `top_k_search`'s: best first, ties to the
  lower index, NO_NEIGHBOUR and -inf past the fused candidates.
  """
  num_queries = rankings[0][1].shape[0]
  scores = np.full((num_queries, k), -np.inf, np.float32)
  indices = np.full((num_queries, k), NO_NEIGHBOUR, np.int32)
  rows = np.concatenate([ranked for _, ranked in rankings], axis=1)
  ranks = np.concatenate([np.broadcast_to(np.arange(1, ranked.shape[1] + 1), ranked.shape)
                          for _, ranked in rankings], axis=1)
  counted = np.concatenate([(ranked != NO_NEIGHBOUR) & (score != 0)
                            for score, ranked in rankings], axis=1)
  contributions = 1.0 / (constant + ranks)
  for query in range(num_queries):
    keep = counted[query]
    candidates, inverse = np.unique(rows[query, keep], return_inverse=True)
    fused = np.bincount(inverse, weights=contributions[query, keep],
                        minlength=len(candidates))
    order = np.lexsort((candidates, -fused))[:k]
    scores[query, :len(order)] = fused[order]
    indices[query, :len(order)] = candidates[order]
  return scores, indices


class _RankedSides:
  """The embedding side (unit rows) and the TF-IDF side of the candidates,
  each searched exactly to max(depth, k) and fused by rank."""

  def __init__(self, dense: np.ndarray, words, depth: int = RRF_DEPTH):
    self.sides = (SparseCandidates(scipy.sparse.csr_matrix(dense)),
                  SparseCandidates(words))
    self.depth = depth

  def search(self, dense: np.ndarray, words, k: int, exclude=None):
    depth = min(max(self.depth, k), self.sides[0].num_candidates)
    rankings = [side.search(scipy.sparse.csr_matrix(rows), depth, exclude=exclude)
                for side, rows in zip(self.sides, (dense, words))]
    return reciprocal_rank_fusion(rankings, k)


def _paired_tfidf(query_vectors, query_titles, index_vectors, index_titles,
                  lexical: str = LEXICAL) -> dict:
  """TF-IDF rows of the queries' titles and the index's, fitted on both."""
  if len(query_titles) != len(query_vectors) or (
      index_vectors is not None and len(index_titles) != len(index_vectors)):
    raise ValueError("one title per embedding row is needed on each side")
  titles = {"queries": query_titles}
  if index_vectors is not None:
    titles["index"] = index_titles
  return tfidf_features(titles, lexical=lexical)


def rrf_blocks(query_vectors: np.ndarray, query_titles: list[str],
               index_vectors: np.ndarray | None, index_titles: list[str] | None,
               k: int, *, block_rows: int, start_row: int = 0,
               depth: int = RRF_DEPTH, lexical: str = LEXICAL):
  """`hybrid_blocks` ranked by reciprocal rank fusion of the embedding's
  cosine ranking and TF-IDF's, each exact to max(depth, k) listings."""
  tfidf = _paired_tfidf(query_vectors, query_titles, index_vectors, index_titles,
                        lexical)
  queries = (unit_rows(np.asarray(query_vectors, np.float32)), tfidf["queries"])
  candidates = queries if index_vectors is None else (
      unit_rows(np.asarray(index_vectors, np.float32)), tfidf["index"])
  ranked = _RankedSides(*candidates, depth)
  for first in range(start_row, queries[0].shape[0], block_rows):
    stop = min(first + block_rows, queries[0].shape[0])
    exclude = np.arange(first, stop) if index_vectors is None else None
    scores, indices = ranked.search(queries[0][first:stop], queries[1][first:stop],
                                    k, exclude)
    yield first, scores, indices


def rrf_retrieval(dense: np.ndarray, sparse, product_ids, category_ids,
                  depth: int = RRF_DEPTH, mesh=None) -> dict:
  """`same_product_retrieval` ranked by reciprocal rank fusion of the
  embedding's cosine and TF-IDF's: what fusion gives without labels."""
  queries = retrieval_queries(product_ids)
  depth = min(max(depth, 10), dense.shape[0])
  rankings = [top_k_neighbours(rows[queries], rows, depth, exclude=queries, mesh=mesh)
              for rows in (unit_rows(np.asarray(dense, np.float32)),
                           scipy.sparse.csr_matrix(sparse, dtype=np.float32))]
  _, neighbours = reciprocal_rank_fusion(rankings, 10)
  return retrieval_metrics(neighbours, queries, product_ids, category_ids)
