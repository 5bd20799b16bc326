"""The errors a user reads. Everything else is a bug and keeps its traceback."""

from __future__ import annotations


class NetsimError(Exception):
    """An error with a message meant for the user; the CLI prints it and exits non-zero."""

    exit_code = 1


class UsageError(NetsimError):
    """A command line netsim cannot act on (what kubectl calls a usage error). Exit status 2."""

    exit_code = 2


class TopologyError(NetsimError):
    """Invalid input: names the file, the document, the field and the fix. Exit status 2."""

    exit_code = 2

    def __init__(self, file: str, document: str, field: str, problem: str, fix: str = ""):
        self.file, self.document, self.field, self.problem, self.fix = (
            file,
            document,
            field,
            problem,
            fix,
        )
        where = f"{file}: {document}" + (f": {field}" if field else "")
        message = f"{where}: {problem}" + (f" — {fix}" if fix else "")
        super().__init__(" ".join(message.splitlines()))  # one line, whatever the input held


class KernelError(NetsimError):
    """A kernel request failed: carries the errno, the object and the namespace."""

    def __init__(self, errno: int, what: str, netns: str | None, detail: str = ""):
        import os

        self.errno, self.what, self.netns = errno, what, netns
        place = f" in netns {netns}" if netns else ""
        msg = f"{what}{place}: {os.strerror(errno) if errno else 'failed'} (errno {errno})"
        super().__init__(msg + (f": {detail}" if detail else ""))
