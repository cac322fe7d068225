"""Done-gates: the criteria a result must meet, and the kernel sandbox that runs
a result's code."""
