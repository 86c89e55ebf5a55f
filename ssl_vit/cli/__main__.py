from ssl_vit.cli import main

main()
