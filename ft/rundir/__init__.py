"""rundir: the run directory contract (DESIGN §4): result files and their readers (`results`),
loggers and the summary (`tracking`), the inputs a run keeps (`kept`). May import `ft.core`,
`ft.data` and `ft.model`.
"""
