"""The worker tier: local models in `imagegate worker` processes, one per GPU, fed by any
number of gateways (`IMAGEGATE_LOCAL_EXECUTION=workers`) through PostgreSQL.

- `client.py`, `remote.py`: the gateway's side. A local model's channel is a `RemoteProvider`;
  a generation becomes a job row, and the gateway waits for its end by notification.
- `runtime.py`, `job.py`, `stack.py`, `main.py`: the worker's side. It claims jobs and the
  async tasks of its models (FOR UPDATE SKIP LOCKED), batches them on its pipelines, and
  writes results back; tasks run through the same task code as on a gateway.
- `codec.py`: a job's request, result and error as JSON; `progress.py`: a job's progress
  across the hop; `signals.py`: LISTEN/NOTIFY.

docs/architecture.md ("The worker tier") has the whole design.
"""
