"""Phase 1B.2 / 1C: turn failures into training data.

* :mod:`cogumi.distill.failures` — judge losses and wrong benchmark answers as training rows.
* :mod:`cogumi.distill.cluster` — failure prompts clustered by topic.
* :mod:`cogumi.distill.self_consistency` — the spec's category-specific self-consistency filter.
* :mod:`cogumi.distill.cascade` — the tiered teacher cascade with a budget cap.
"""
