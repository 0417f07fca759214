"""`python -m mgpumanager.sim SERVICE --port N`: the same as `mgpumanager sim`."""

from mgpumanager.sim.single import main

raise SystemExit(main())
