from mpnet_dist.cli import main

main()
