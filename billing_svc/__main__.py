from billing_svc.server import main

main()
