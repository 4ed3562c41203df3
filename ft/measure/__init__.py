"""measure: what is said about a fitted input: metrics and word statistics (`metrics`), fluency
(`fluency`), dataset-example scoring and probing (`examples`, `probe`, `probe_ablation`). May
import every layer below it, up to `engine`.
"""
