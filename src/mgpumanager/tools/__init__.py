"""Commands around the daemon: moving a box over (`init`, with `discover`, `identify`, `procfs`
and `proposal`), the demo, the remote CLI (`status`, `unload`, ...) and `deploy`."""
