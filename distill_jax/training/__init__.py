"""The training layer: state, the pure step and its jit/pmap wrappers, sharding, on-policy sampling, distributed set-up, and the loop with its run dir/log/report."""
