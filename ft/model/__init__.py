"""model: the frozen encoder and how ft reads it. One architecture adapter per family
(`arch/`), loading (`encoder`), the site grammar (`sites`), the hooked and the lean readers
(`fastforward`), the hand-written backward (`leangrad`), ablation (`ablate`), the vocabulary
sweep (`vocab`), static weight readings (`static`) and word substitutes (`substitutes`).
May import `ft.core` and `ft.data`.
"""
