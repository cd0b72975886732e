"""pFedHN: personalized federated learning with hypernetworks, on Flower."""
