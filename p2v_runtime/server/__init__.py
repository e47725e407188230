"""``p2v serve``: the sidecar runtime the Blender add-on talks to over one TCP connection.

One job at a time; the models stay warm in this process between jobs and clients (the editor's
model cache owns them). One concern a module:

- ``server``: listening, accepting, the connection limit, the one job slot, the idle timeout;
- ``connection``: one client's reader loop (it spools frames as they arrive) and its hang-up;
- ``writer``: the thread that sends a connection's messages, so reading never waits on a client
  that is slow to take results;
- ``job``: one job's thread, its runner, its last message and its stats;
- ``spool``: a job's frames on disk, and the frames object its runner reads;
- ``echo``: a runner without a model, for tests and benchmarks (``--job-runner echo`` only);
- ``cli``: ``p2v serve``'s arguments and entry point.

The wire format is ``protocol.py``; ``docs/protocol.md`` describes the whole exchange. Importing
this package imports neither torch nor numpy: the editor is imported by the first job.
"""

from .cli import add_serve_arguments, main, serve_main
from .job import JobRunner, edit_job_runner
from .server import Server, is_loopback
from .spool import SpooledFrames

__all__ = [
    "JobRunner",
    "Server",
    "SpooledFrames",
    "add_serve_arguments",
    "edit_job_runner",
    "is_loopback",
    "main",
    "serve_main",
]
