"""Helpers of the test suite: launching training ranks, process groups, injected faults, GPU compilation."""
