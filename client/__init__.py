"""blobchain.client"""
