"""core: what every layer may use and nothing of ft's own depends on below it.

Errors (`errors`), atomic writes and the integrity of files (`integrity`, `files`), the cache
folder, progress bars (`bars`), the output level (`chatter`), CPU facts (`cpuinfo`, `cpualloc`),
signal handling (`signals`) and the map of moved module names (`moved`). Modules here import
only the standard library, third-party packages and other `ft.core` modules.
"""
