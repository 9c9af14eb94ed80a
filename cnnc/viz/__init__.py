"""Pictures of networks: the graph drawn, feature maps, reports."""
