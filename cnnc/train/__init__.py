"""Training: the gradient as a graph transformation (autodiff, rules), the graph of one
training step (step), and the loop that runs it on data (trainer)."""
