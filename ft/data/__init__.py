"""data: text and vectors read from disk: corpora (`corpus`), concept word lists (`concepts`)
and directions files (`directions`). May import `ft.core` only.
"""
